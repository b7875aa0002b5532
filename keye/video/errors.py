"""Errors of keye.video: every bad input names the file and the cause.

A bad file never yields made-up frames (no zero padding, no repeated last frame): it raises one of these. They
all derive from `VideoError`, so a loader can catch one type, report `err.source` and `err.cause`, and go on.
`VideoNotFoundError` is also a FileNotFoundError, and `VideoTimeoutError` a TimeoutError, so callers that catch
the builtin types keep working.
"""

from __future__ import annotations


class VideoError(Exception):
    """A video that cannot give the requested frames. `source` is the file path (or "<bytes>"), `cause` a
    sentence saying what is wrong with it."""

    kind = "unreadable"

    def __init__(self, source, cause: str):
        self.source = str(source)
        self.cause = cause
        super().__init__(f"{self.source}: {self.kind} video: {cause}")

    def __reduce__(self):  # picklable (raised in worker processes, e.g. DaliDecoder(cut_processes=...))
        return self.__class__, (self.source, self.cause)


class VideoNotFoundError(VideoError, FileNotFoundError):
    kind = "missing"


class EmptyVideoError(VideoError):
    """Zero-length file, or a container without a single video frame."""

    kind = "empty"


class TruncatedVideoError(VideoError):
    """The file ends before the data its own header announces (cut download, unfinished write)."""

    kind = "truncated"


class CorruptVideoError(VideoError):
    """Not a parsable container, or its video data cannot be decoded."""

    kind = "corrupted"


class NoVideoStreamError(VideoError):
    """A valid media file with no video stream (audio only, subtitles only)."""

    kind = "no-video-stream"


class UnsupportedCodecError(VideoError):
    """The video stream's codec has no decoder on the chosen path (e.g. AV1 on an H200's NVDEC)."""

    kind = "unsupported-codec"


class VideoTimeoutError(VideoError, TimeoutError):
    """Decoding one file took longer than the loader's per-file limit."""

    kind = "timed-out"
