"""Per-video frame index: the presentation time of every frame and where the key frames are.

Built once per video by demuxing with PyAV (reads packet headers, decodes nothing, so it is cheap even for
hour-long videos). Frame i is the i-th frame in *presentation* order (packets sorted by PTS), the same numbering
DALI's `decoders.video(frames=...)` uses. Timestamps are real PTS, so variable-frame-rate videos are handled:
frame i is shown from `timestamps[i]` until `timestamps[i + 1]` (the last one for `last_duration`). Times are in
seconds from the first frame (the first frame is at 0.0), as Keye's prompts expect.

For H.264 and HEVC the index also records which key frames are *random-access points* (IDR, resp. IRAP
pictures): a key-flagged non-IDR I-frame (x264 puts them at scene cuts; 73 of the 190 key frames of the 10-minute
Big Buck Bunny) can start a software decoder, which knows the parameter sets from the container, but not NVDEC
through DALI: FFmpeg's h264_mp4toannexb filter inserts SPS/PPS only before IDR pictures, and DALI's own index
counts only IDR/IRAP pictures as key frames. keye.video.dali cuts pieces only there and refuses streams that
start anywhere else.

For H.264 the index also records which frames are *disposable*: non-reference pictures (nal_ref_idc 0 on every
slice), which no other picture predicts from, so a decoder that skips them produces every other frame bit for bit
the same. x264 makes about half of a film's frames so (B-frames outside the pyramid: 6,845 of the 10-minute
film's 14,315), which is why keye.video.dali leaves the unwanted ones out of the pieces it gives NVDEC.

Problems found while indexing raise keye.video.errors types naming the file: missing, zero-length, not a
container, no video stream, no frames, packets cut off by the end of the file, packets without timestamps.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from keye.video.errors import (CorruptVideoError, EmptyVideoError, NoVideoStreamError, TruncatedVideoError,
                               UnsupportedCodecError, VideoNotFoundError)

BYTES_NAME = "<bytes>"


def source_name(source) -> str:
    return BYTES_NAME if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def read_source(source) -> bytes:
    """The encoded bytes of a path or bytes-like source (for decoders that take memory, such as DALI)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    check_file(source)
    with open(source, "rb") as f:
        return f.read()


def check_file(source) -> int:
    """Size in bytes of a file source; raises for a missing / non-regular / empty file."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise EmptyVideoError(BYTES_NAME, "zero-length input")
        return len(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"keye.video: a video source must be a path or bytes, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise VideoNotFoundError(path, "no such file")
    if not os.path.isfile(path):
        raise VideoNotFoundError(path, "not a regular file")
    size = os.path.getsize(path)
    if size == 0:
        raise EmptyVideoError(path, "zero-length file")
    return size


def open_container(source):
    """av.open on a path or bytes, with container-level failures turned into VideoErrors."""
    import av

    size = check_file(source)
    name = source_name(source)
    try:
        return av.open(io.BytesIO(bytes(source)) if name == BYTES_NAME else os.fspath(source), "r"), size
    except av.error.FFmpegError as e:
        head = bytes(source[:1 << 16]) if name == BYTES_NAME else open(source, "rb").read(1 << 16)
        if head[4:8] == b"ftyp" and b"moov" not in (bytes(source) if name == BYTES_NAME else open(source, "rb").read()):
            raise TruncatedVideoError(name, "MP4/MOV without its 'moov' index box (file cut off before the end, or "
                                            "never finalised)") from e
        raise CorruptVideoError(name, f"not a readable media container ({e.strerror or e})") from e


@dataclass(frozen=True, eq=False)
class VideoIndex:
    source: str
    codec: str                 # codec of the video stream (FFmpeg canonical name: h264, hevc, vp9, av1, ...)
    width: int
    height: int
    time_base: Fraction        # seconds per PTS unit
    pts: np.ndarray            # int64 [N], sorted: presentation order
    keyframe: np.ndarray       # bool [N], same order
    last_duration: float       # display time of the last frame, seconds
    file_size: int
    # bool [N]: key frames that are random-access points for a hardware decoder (IDR for H.264, IRAP for HEVC,
    # every key frame for other codecs). None where unknown (an index built by hand): then the key frames.
    random_access: np.ndarray | None = None
    # bool [N]: frames no other frame references (H.264 pictures whose slices all have nal_ref_idc 0, in packets
    # that carry no parameter sets): a decoder may leave them out unless they are wanted. None where unknown
    # (other codecs; an index built by hand): then no frame is disposable.
    disposable: np.ndarray | None = None

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])

    @property
    def timestamps(self) -> np.ndarray:
        """float64 [N] seconds from the first frame."""
        return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)

    @property
    def duration(self) -> float:
        """From the start of the first frame to the end of the last one, seconds."""
        return float(self.timestamps[-1] + self.last_duration)

    @property
    def average_fps(self) -> float:
        return self.num_frames / self.duration

    def keyframe_at_or_before(self, frames: np.ndarray) -> np.ndarray:
        """For each frame index, the index of the last key frame whose PTS is <= that frame's PTS (where a
        decoder must start to produce it)."""
        return self._start_at_or_before(self.keyframe, frames, "key frame")

    @property
    def random_access_points(self) -> np.ndarray:
        """bool [N]: where a hardware decoder can start (see `random_access`)."""
        return self.keyframe if self.random_access is None else self.random_access

    def random_access_at_or_before(self, frames: np.ndarray) -> np.ndarray:
        """Like keyframe_at_or_before, for random-access points (IDR / IRAP pictures for H.264 / HEVC)."""
        return self._start_at_or_before(self.random_access_points, frames, "random-access (IDR/IRAP) frame")

    def _start_at_or_before(self, mask: np.ndarray, frames, what: str) -> np.ndarray:
        starts = np.flatnonzero(mask)
        pos = np.searchsorted(starts, np.asarray(frames), side="right") - 1
        if (pos < 0).any():  # frames before the first such frame cannot be decoded starting from it
            raise CorruptVideoError(self.source, f"frames before the first {what} were requested")
        return starts[pos]


def build_index(source) -> VideoIndex:
    """Demux `source` (path or bytes) and return its VideoIndex (see module doc)."""
    import av

    name = source_name(source)
    container, size = open_container(source)
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise NoVideoStreamError(name, f"no video stream (the file holds {', '.join(kinds)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None or ctx.codec is None or not getattr(ctx.codec, "name", None):
            raise UnsupportedCodecError(name, f"FFmpeg has no decoder for its video codec (container "
                                              f"{container.format.name})")
        tb = stream.time_base
        if tb is None or tb <= 0:
            raise CorruptVideoError(name, "video stream has no time base")
        codec = getattr(ctx.codec, "canonical_name", None) or ctx.codec.name
        length_size = _nal_length_size(codec, ctx.extradata)
        pts, key, durations, random_access, disposable = [], [], [], [], []
        packets = 0  # including those an edit list drops: the header's frame count includes them too
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packets += 1
                if getattr(packet, "is_discard", False):  # dropped by an edit list; never shown
                    continue
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    raise CorruptVideoError(name, f"video packet {len(pts)} has no timestamp; cannot index frames")
                if packet.pos is not None and packet.pos >= 0 and packet.pos + packet.size > size:
                    raise TruncatedVideoError(name, f"video packet {len(pts)} at byte {packet.pos} (+{packet.size}) "
                                                    f"runs past the end of the {size}-byte file")
                pts.append(t)
                key.append(packet.is_keyframe)
                headers = None if length_size is None else _nal_headers(bytes(packet), length_size)
                random_access.append(packet.is_keyframe and (headers is None or _is_random_access(headers, codec)))
                disposable.append(headers is not None and _is_disposable(headers, codec))
                durations.append(packet.duration or 0)
        except av.error.FFmpegError as e:
            raise CorruptVideoError(name, f"demuxing failed after {len(pts)} video packets ({e.strerror or e})") from e
        if not pts:
            raise EmptyVideoError(name, "the video stream holds no frames")
        announced = stream.frames or 0
        if container.format.name.startswith("mov") and announced > packets:
            raise TruncatedVideoError(name, f"the header announces {announced} video frames but only {packets} are "
                                            "in the file")
        announced_s = _announced_duration(container, stream)
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        pts_sorted = np.asarray(pts, dtype=np.int64)[order]
        if (np.diff(pts_sorted) == 0).any():
            raise CorruptVideoError(name, "two video frames share one presentation timestamp")
        keyframe = np.asarray(key, dtype=bool)[order]
        random_access = np.asarray(random_access, dtype=bool)[order]
        disposable = np.asarray(disposable, dtype=bool)[order] if codec in _DISPOSABLE_CODECS else None
        if not keyframe.any():
            raise CorruptVideoError(name, "the video stream has no key frame")
        last = durations[order[-1]]
        if last <= 0:  # unknown duration: assume the typical frame spacing
            last = int(np.median(np.diff(pts_sorted))) if len(pts_sorted) > 1 else 0
        if last <= 0 and stream.average_rate:
            last = 1 / (float(stream.average_rate) * float(tb))
        index = VideoIndex(source=name, codec=codec, width=int(ctx.width), height=int(ctx.height),
                           time_base=Fraction(tb), pts=pts_sorted, keyframe=keyframe,
                           last_duration=float(last) * float(tb), file_size=size, random_access=random_access,
                           disposable=disposable)
        if announced_s is not None and not container.format.name.startswith("mov"):
            # Matroska/WebM carry no frame count, but a duration written when the file was finalised.
            # Compared with the absolute end time of the last frame: a file (or a cut piece) may start late.
            end_s = float(pts_sorted[-1] * tb) + index.last_duration
            slack = 0.5 + 2 * index.duration / index.num_frames
            if end_s + slack < announced_s:
                raise TruncatedVideoError(name, f"the header announces {announced_s:.3f} s of video but its frames "
                                                f"end at {end_s:.3f} s")
        return index


def _announced_duration(container, stream) -> float | None:
    """The video's duration as the header states it, in seconds, if it states one for this stream."""
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            return None
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if len(container.streams) == 1 and container.duration:
        return container.duration / 1e6
    return None


# NAL unit types of random-access pictures: H.264 IDR slice; HEVC IRAP (BLA, IDR, CRA: 16..21), as DALI counts them.
_RANDOM_ACCESS_NALS = {"h264": frozenset({5}), "hevc": frozenset(range(16, 22))}


def _nal_length_size(codec: str, extradata: bytes | None) -> int | None:
    """Bytes of each NAL unit's length prefix in this stream's packets (avcC/hvcC extradata), 0 for Annex B start
    codes, None for codecs without NAL units (their key frames are all random-access points)."""
    if codec not in _RANDOM_ACCESS_NALS:
        return None
    data = bytes(extradata or b"")
    if codec == "h264" and len(data) >= 7 and data[0] == 1:  # avcC: lengthSizeMinusOne in byte 4
        return (data[4] & 3) + 1
    if codec == "hevc" and len(data) >= 23 and data[0] == 1:  # hvcC: lengthSizeMinusOne in byte 21
        return (data[21] & 3) + 1
    return 0


def _nal_headers(data: bytes, length_size: int) -> list[int]:
    """The first header byte of each NAL unit in one packet, length-prefixed (length_size > 0) or Annex B (0)."""
    headers = []
    if length_size == 0:  # Annex B. (No sniffing otherwise: a length prefix 00 00 01 xx looks like a start code.)
        pos = data.find(b"\0\0\1")
        while 0 <= pos < len(data) - 3:
            headers.append(data[pos + 3])
            pos = data.find(b"\0\0\1", pos + 3)
        return headers
    pos = 0
    while pos + length_size < len(data):
        size = int.from_bytes(data[pos:pos + length_size], "big")
        if size <= 0 or pos + length_size + size > len(data):
            break
        headers.append(data[pos + length_size])
        pos += length_size + size
    return headers


def _nal_type(header: int, codec: str) -> int:
    return header & 0x1F if codec == "h264" else (header >> 1) & 0x3F


def _nal_types(data: bytes, codec: str, length_size: int) -> list[int]:
    """The NAL unit types in one packet, length-prefixed (length_size > 0) or Annex B (0)."""
    return [_nal_type(h, codec) for h in _nal_headers(data, length_size)]


def _is_random_access(headers: list[int], codec: str) -> bool:
    return any(_nal_type(h, codec) in _RANDOM_ACCESS_NALS[codec] for h in headers)


# Disposable pictures are known for H.264 only. (HEVC's sub-layer non-reference pictures may still be referenced
# by pictures of higher temporal layers; not handled, so HEVC frames are never left out.)
_DISPOSABLE_CODECS = frozenset({"h264"})
# H.264 NAL units that may travel with a disposable picture: SEI, access unit delimiter, filler. Anything else
# (parameter sets, end of sequence, data partitions) keeps the packet.
_H264_HARMLESS_NALS = frozenset({6, 9, 12})


def _is_disposable(headers: list[int], codec: str) -> bool:
    """A non-reference H.264 picture (non-IDR slices with nal_ref_idc 0) and nothing a later picture needs."""
    if codec not in _DISPOSABLE_CODECS:
        return False
    slices = [h for h in headers if h & 0x1F == 1]
    return bool(slices) and all(h & 0x60 == 0 for h in slices) and \
        all(h & 0x1F in _H264_HARMLESS_NALS for h in headers if h & 0x1F != 1)
