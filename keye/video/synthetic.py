"""Test clips whose frames carry their own index as a barcode, and re-encodes of real footage (PyAV encoders).

Used by the tests and the benchmark to check frame exactness: decode frame i at time t, read the barcode, it
must say i. The barcode is BITS vertical bars across the frame, black = 0 and white = 1, most significant bit
left; bars are wide and full height, so lossy coding and resizing leave them readable.
"""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np

BITS = 12
ENCODERS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1", "mjpeg": "mjpeg"}
_OPTIONS = {
    # B-frames and several GOPs on purpose: frame reordering and seeking are what exactness tests must cover.
    "libx264": {"preset": "veryfast", "x264-params": "keyint=30:min-keyint=30:bframes=2:log-level=error"},
    "libx265": {"preset": "ultrafast", "x265-params": "keyint=30:min-keyint=30:bframes=2:log-level=error"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "g": "30"},
    "libsvtav1": {"preset": "10", "g": "30", "crf": "18"},
    "mjpeg": {},
}


def _quiet_encoders() -> None:
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner per stream otherwise; 1 = errors only


def barcode_image(index: int, height: int, width: int) -> np.ndarray:
    """uint8 [height, width, 3]: the bits of `index` as BITS vertical bars."""
    if not 0 <= index < (1 << BITS):
        raise ValueError(f"barcode_image: index must be in [0, {1 << BITS}), got {index}")
    bits = (index >> np.arange(BITS - 1, -1, -1)) & 1
    cols = (np.arange(width) * BITS // width).clip(0, BITS - 1)
    row = (bits[cols] * 255).astype(np.uint8)
    return np.repeat(np.broadcast_to(row[None, :, None], (height, width, 1)), 3, axis=2).copy()


def read_barcode(frames) -> np.ndarray:
    """int64 [N]: the index each frame of uint8 [N, H, W, 3] (numpy or torch, any device) shows. Reads the middle
    half of every bar (away from edges blurred by coding or resizing)."""
    import torch

    x = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    x = x.float().mean(dim=-1)  # [N, H, W]
    n, h, w = x.shape
    bit = torch.zeros(n, dtype=torch.long, device=x.device)
    for b in range(BITS):
        a, z = (w * b) // BITS, (w * (b + 1)) // BITS
        q = (z - a) // 4
        level = x[:, h // 4: 3 * h // 4, a + q: z - q].mean(dim=(1, 2))
        bit = bit * 2 + (level > 127.5).long()
    return bit.cpu().numpy()


def write_barcode_video(path: str, num_frames: int, *, codec: str = "h264", height: int = 144, width: int = 192,
                        fps: int = 25, durations_ms=None, container_format: str | None = None,
                        open_gop: bool = False, non_idr_keys: bool = False) -> np.ndarray:
    """Write a clip whose frame i shows barcode i. Constant frame rate `fps`, or variable frame rate with frame i
    lasting durations_ms[i % len(durations_ms)] milliseconds. `open_gop` (h264 only): key frames are non-IDR
    I-frames whose leading B-frames reference the previous group, as in many real encodes (a decoder that starts
    at such a key frame first outputs pictures shown before it). `non_idr_keys` (h264 only): x264's open-GOP mode
    without B-frames, so there are no leading pictures: after the first, key frames are non-IDR I-frames that a
    software decoder can start at (like x264's scene-cut I-frames in real films) but NVDEC through DALI cannot.
    Returns the frames' timestamps in seconds."""
    import av

    _quiet_encoders()
    if codec not in ENCODERS:
        raise ValueError(f"write_barcode_video: codec must be one of {sorted(ENCODERS)}, got {codec!r}")
    if durations_ms is None:
        tb = Fraction(1, fps)
        pts = np.arange(num_frames, dtype=np.int64)
    else:
        tb = Fraction(1, 1000)
        steps = np.resize(np.asarray(durations_ms, dtype=np.int64), num_frames)
        pts = np.concatenate([[0], np.cumsum(steps)[:-1]])
    with av.open(path, "w", format=container_format) as out:
        stream = out.add_stream(ENCODERS[codec], rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.time_base = tb
        stream.codec_context.time_base = tb
        stream.options = dict(_OPTIONS[ENCODERS[codec]])
        if open_gop:
            if codec != "h264":
                raise ValueError("write_barcode_video: open_gop is only implemented for h264")
            stream.options["x264-params"] += ":open-gop=1"
        if non_idr_keys:
            if codec != "h264" or open_gop:
                raise ValueError("write_barcode_video: non_idr_keys is only implemented for h264 without open_gop")
            stream.options["x264-params"] += ":open-gop=1:bframes=0"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(barcode_image(i, height, width), format="rgb24")
            frame.pts, frame.time_base = int(pts[i]), tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return pts.astype(np.float64) * float(tb)


def remux_from(src: str, dst: str, first_pts: int, container_format: str = "matroska") -> None:
    """Copy the video packets of `src` whose PTS >= first_pts into `dst` (no re-encoding): a file that starts at
    that frame, which must be a key frame, of a stream without B-frames (decode order = display order)."""
    import av

    with av.open(src) as inp, av.open(dst, "w", format=container_format) as out:
        stream = inp.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in inp.demux(stream):
            if packet.size == 0 or packet.pts is None or packet.pts < first_pts:
                continue
            packet.stream = copy
            out.mux(packet)


def reencode(src: str, dst: str, codec: str, max_frames: int | None = None,
             container_format: str | None = None) -> int:
    """Re-encode the video stream of `src` (real footage) with `codec`; returns the number of frames written."""
    import av

    _quiet_encoders()
    n = 0
    with av.open(src) as inp, av.open(dst, "w", format=container_format) as out:
        vin = inp.streams.video[0]
        rate = vin.average_rate or 25
        stream = out.add_stream(ENCODERS[codec], rate=rate)
        stream.width, stream.height = vin.codec_context.width, vin.codec_context.height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = dict(_OPTIONS[ENCODERS[codec]])
        for frame in inp.decode(vin):
            if max_frames is not None and n >= max_frames:
                break
            img = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            img.pts = n
            for packet in stream.encode(img):
                out.mux(packet)
            n += 1
        for packet in stream.encode():
            out.mux(packet)
    return n
