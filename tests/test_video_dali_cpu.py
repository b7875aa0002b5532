"""keye.video.dali's wiring on DALI's CPU decoder (VP9/VP8/MJPEG only in DALI 2.4), so it is checked on machines
without a GPU when nvidia-dali-cuda130 is installed (skipped otherwise; the GPU path is tests/test_video_gpu.py)."""

import numpy as np
import pytest
import torch

pytest.importorskip("av", reason="PyAV builds the frame index")

from keye.video import CorruptVideoError, UnsupportedCodecError, VideoNotFoundError, build_index  # noqa: E402
from keye.video.dali import dali_available  # noqa: E402
from keye.video.synthetic import read_barcode, write_barcode_video  # noqa: E402

pytestmark = pytest.mark.skipif(dali_available() is not None, reason=str(dali_available()))


@pytest.fixture(scope="module")
def decoder():
    from keye.video.dali import DaliDecoder

    with DaliDecoder(num_streams=2, device="cpu") as d:
        yield d


@pytest.fixture(scope="module")
def vp9(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dali") / "vfr.webm")
    write_barcode_video(path, 200, codec="vp9", durations_ms=[40, 20])
    return path


def test_decode_exact_any_order(decoder, vp9, fresh_seed):
    want = np.random.default_rng(fresh_seed).integers(0, 200, 40)
    out = decoder.decode(vp9, want)
    assert out.dtype == torch.uint8 and out.shape == (40, 144, 192, 3)
    assert (read_barcode(out) == want).all()


def test_decode_split_pieces(decoder, vp9, fresh_seed):
    index = build_index(vp9)
    want = np.random.default_rng(fresh_seed).integers(0, 200, 50)
    assert (read_barcode(decoder.decode_split(vp9, want, index, parts=3)) == want).all()


def test_decode_many_reports_errors(decoder, vp9, tmp_path):
    h264 = str(tmp_path / "h.mp4")
    write_barcode_video(h264, 20, codec="h264")
    garbage = str(tmp_path / "g.webm")
    open(garbage, "wb").write(b"\x1a\x45\xdf\xa3" + bytes(3000))
    out = decoder.decode_many([(vp9, [0, 199], None), (str(tmp_path / "none.webm"), [0], None),
                               (h264, [0], None), (garbage, [0], None), (vp9, [7], None)])
    assert (read_barcode(out[0]) == [0, 199]).all() and (read_barcode(out[4]) == [7]).all()
    assert isinstance(out[1], VideoNotFoundError)
    assert isinstance(out[2], UnsupportedCodecError)  # no H.264 on DALI's CPU decoder
    assert isinstance(out[3], CorruptVideoError)


def test_no_padding_past_the_end(decoder, vp9):
    with pytest.raises(ValueError, match=r"frame indices must be in \[0, 200\)"):
        decoder.decode(vp9, [150, 200])
