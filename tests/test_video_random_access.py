"""Random-access points (IDR / IRAP pictures) in the frame index, and what keye.video.dali does with them: pieces
for split GPU decoding start only there, and GPU decoding refuses streams that start at a non-IDR key frame
(FFmpeg's mp4toannexb filters give NVDEC the parameter sets only before IDR pictures; see keye/video/dali.py).
Runs on the CPU: no DALI needed for the index, the split, the pieces or the refusal rule."""

import numpy as np
import pytest

av = pytest.importorskip("av", reason="PyAV builds the frame index")

from keye.video import UnsupportedCodecError, build_index, decode_frames_cpu  # noqa: E402
from keye.video.dali import check_nvdec_start, cut_piece, split_at_random_access  # noqa: E402
from keye.video.index import _nal_types  # noqa: E402
from keye.video.synthetic import read_barcode, remux_from, write_barcode_video  # noqa: E402


@pytest.fixture(scope="module")
def non_idr(tmp_path_factory):
    """H.264 whose key frames are partly non-IDR I-frames (no leading pictures), as in real x264 films."""
    path = str(tmp_path_factory.mktemp("ra") / "non_idr.mp4")
    write_barcode_video(path, 240, codec="h264", non_idr_keys=True)
    return path, build_index(path)


@pytest.mark.parametrize("codec,ext,fmt", [("h264", "mp4", None), ("h264", "mkv", None), ("h264", "ts", "mpegts"),
                                           ("hevc", "mp4", None), ("vp9", "webm", None)],
                         ids=["h264-mp4", "h264-mkv", "h264-annexb-ts", "hevc-mp4", "vp9-webm"])
def test_idr_only_streams_are_random_access_at_every_key_frame(tmp_path, codec, ext, fmt):
    """The encoder settings (keyint=min-keyint, closed GOP; x265's CRA key frames count as IRAP, as DALI counts
    them) make every key frame a random-access point: the NAL parse must agree, length-prefixed or Annex B."""
    path = str(tmp_path / f"clip.{ext}")
    write_barcode_video(path, 100, codec=codec, container_format=fmt)
    index = build_index(path)
    assert index.keyframe.sum() >= 3
    assert np.array_equal(index.random_access, index.keyframe)


def test_non_idr_key_frames_are_not_random_access(non_idr):
    _, index = non_idr
    ra, key = index.random_access, index.keyframe
    assert ra[0] and not (ra & ~key).any()     # random-access points are key frames; the stream starts at one
    assert (key & ~ra).any()                   # and the non-IDR I-frames are told apart
    frames = np.array([0, 50, 120, 239])
    starts = index.random_access_at_or_before(frames)
    assert ra[starts].all() and (starts <= frames).all()
    assert (index.keyframe_at_or_before(frames) >= starts).all()


def test_nal_parser_does_not_mistake_length_prefixes_for_start_codes():
    """A 4-byte length prefix of 256..511 bytes reads 00 00 01 xx, like an Annex B start code."""
    sei = b"\x06" + bytes(299)                        # 300-byte NAL: prefix 00 00 01 2c
    idr = b"\x65" + b"\x88" * 40
    avcc = len(sei).to_bytes(4, "big") + sei + len(idr).to_bytes(4, "big") + idr
    assert _nal_types(avcc, "h264", 4) == [6, 5]
    annexb = b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x01\x68\xce" + b"\x00\x00\x01" + idr
    assert _nal_types(annexb, "h264", 0) == [7, 8, 5]
    hevc = (3).to_bytes(4, "big") + bytes([19 << 1, 1, 0xAA])   # IDR_W_RADL
    assert _nal_types(hevc, "hevc", 4) == [19]
    assert _nal_types(b"\x00\x00", "h264", 4) == []  # truncated: nothing, no error


def test_split_pieces_start_at_random_access_and_are_exact(non_idr, fresh_seed):
    path, index = non_idr
    want = np.unique(np.random.default_rng(fresh_seed).integers(0, index.num_frames, 80))
    runs = split_at_random_access(index, want, 4)
    assert np.array_equal(np.concatenate(runs), want) and len(runs) > 1
    for run in runs:
        piece, local = cut_piece(path, index, run)
        piece_index = build_index(piece)
        check_nvdec_start(piece_index)  # NVDEC can start the piece
        first = int(np.flatnonzero(piece_index.keyframe)[0])
        assert piece_index.random_access[first]
        assert (read_barcode(decode_frames_cpu(piece, local)) == run).all()


def test_keyframe_split_may_start_at_non_idr(non_idr):
    """What the random-access split avoids: cut at every key frame, some runs begin at a non-IDR I-frame."""
    _, index = non_idr
    want = np.arange(index.num_frames)
    by_key = split_at_random_access(index, want, 40, starts="keyframe")
    firsts = index.keyframe_at_or_before(np.array([r[0] for r in by_key]))
    assert (~index.random_access[firsts]).any()
    by_ra = split_at_random_access(index, want, 40)
    assert index.random_access[index.keyframe_at_or_before(np.array([r[0] for r in by_ra]))].all()
    with pytest.raises(ValueError, match="split_at_random_access: starts"):
        split_at_random_access(index, want, 2, starts="scene")


def test_stream_starting_at_non_idr_key_frame_is_refused_for_nvdec(non_idr, tmp_path):
    path, index = non_idr
    check_nvdec_start(index)  # starts at an IDR: accepted
    start = int(np.flatnonzero(index.keyframe & ~index.random_access)[0])
    cut = str(tmp_path / "from_non_idr.mkv")
    remux_from(path, cut, int(index.pts[start]))
    cut_index = build_index(cut)
    with pytest.raises(UnsupportedCodecError, match="not an IDR/IRAP picture"):
        check_nvdec_start(cut_index)
    # The file itself is fine: a software decoder starts there and gets exactly the frames.
    assert (read_barcode(decode_frames_cpu(cut, np.arange(cut_index.num_frames))) ==
            start + np.arange(cut_index.num_frames)).all()

