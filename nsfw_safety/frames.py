"""Animations and videos as frames: header checks, decoding, and censored copies.

* **Animations** (animated GIF, WebP and APNG, and any other multi-frame file Pillow reads) are
  decoded with Pillow: every frame as a viewer sees it (disposal and blending applied), each with
  its duration. An APNG's default image, which players that know APNG skip and others show, is
  frame 0: it is checked like the rest, with time 0 and duration 0.
* **Videos** (MP4, MOV, WebM, MKV) are decoded with PyAV, whose wheels bundle FFmpeg
  (``pip install nsfw-safety[video]``). With ``decoder="torchcodec"`` they are decoded by
  torchcodec where it is installed, on the GPU with ``device="cuda"``; it needs FFmpeg's shared
  libraries, which :func:`link_pyav_ffmpeg` can take from PyAV's wheel.
* **Limits** (:class:`VideoLimits`) are checked from the header before anything is decoded, and
  again while decoding, since a header can lie.
* **Censored copies** (:func:`write_censored`) keep the original's format: the frame rate and
  every frame's timestamp for videos, with the audio copied packet for packet; every frame, its
  duration and the loop count for animations (identical neighbours are not merged). They are written to a temporary file beside the
  target and linked into place, so a killed process leaves no half-written file, and neither the
  input nor an existing file is ever overwritten (unless ``overwrite=True`` for the latter).

Decoding is streamed: only the frames handed out are kept, so memory does not grow with the
length of the video.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from . import inputs as _inputs

#: PyAV container names accepted as video (FFmpeg also "decodes" text files and images).
VIDEO_CONTAINERS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV", "matroska,webm": "WebM/MKV"}
#: The container written for each suffix (the output keeps the input's suffix).
_MUXERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".webm": "webm", ".mkv": "matroska"}
#: Encoders for the codecs a censored copy may need, where FFmpeg's decoder name differs.
_ENCODERS = {"h264": "libx264", "vp8": "libvpx", "vp9": "libvpx-vp9", "av1": "libaom-av1", "hevc": "libx265"}
#: Pillow formats that can write an animation back.
ANIMATION_WRITERS = ("GIF", "PNG", "WEBP")
DECODERS = ("auto", "pyav", "torchcodec")

Select = Callable[[int, "float | None"], bool]


class VideoError(ValueError):
    """A file that cannot be read as a video or an animation; the message names it."""


class VideoTooLarge(VideoError, _inputs.ImageTooLarge):
    """A video or animation over a :class:`VideoLimits` limit (from its header or while decoding).

    Attributes:
        limit: the :class:`VideoLimits` field crossed: ``"pixels"``, ``"frames"`` or
            ``"duration"`` (None for other sizes, e.g. a censored copy's memory).
    """

    def __init__(self, message: str, limit: str | None = None):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True)
class VideoLimits:
    """What a file may hold before it is refused, checked from the header before decoding.

    Attributes:
        max_pixels: pixels per frame (width * height); default 8K UHD.
        max_frames: frames in the file.
        max_duration: seconds of playing time.
    """

    max_pixels: int = 7680 * 4320
    max_frames: int = 500_000
    max_duration: float = 6 * 3600.0


@dataclass(frozen=True)
class VideoInfo:
    """What a file's header says, and which file it was.

    Attributes:
        path: the file.
        kind: ``"animation"`` (Pillow) or ``"video"`` (PyAV).
        format: Pillow's format (``"GIF"``, ``"PNG"``, ``"WEBP"``, ...) or the video container
            (``"mp4"``, ``"webm"``, ...; from the suffix, as PyAV names MP4 and MOV alike).
        width, height: the frame size (the canvas, for animations).
        frames: how many frames the file holds (M in "checked N of M frames"): the header's count,
            or the number of video packets where the header gives none (WebM).
        fps: the average frame rate of a video; None for animations.
        duration: playing time in seconds, when the header gives it.
        loop: an animation's loop count (0 = forever); None when the file has none (GIF: play once).
        default_image: an APNG whose frame 0 is a default image outside the animation.
        codec: a video's codec (``"h264"``, ``"vp9"``, ...).
        audio: a video has an audio stream.
        fingerprint: (size, mtime_ns) of the file when it was read; a censored copy is refused if
            the file has changed since it was checked.
    """

    path: Path
    kind: str
    format: str
    width: int
    height: int
    frames: int
    fps: float | None = None
    duration: float | None = None
    loop: int | None = None
    default_image: bool = False
    codec: str | None = None
    audio: bool = False
    fingerprint: tuple[int, int] = field(default=(0, 0), repr=False)


@dataclass(frozen=True)
class Frame:
    """One decoded frame.

    Attributes:
        index: its position in the file, from 0.
        time: when it is shown, in seconds from the start (None if the file does not say).
        duration: how long it is shown, in seconds (None if unknown).
        image: None for frames not selected; else a PIL image (animations), a (H, W, 3) uint8
            RGB numpy array (PyAV), or a (3, H, W) uint8 tensor on the decoder's device (torchcodec).
    """

    index: int
    time: float | None
    duration: float | None
    image: Any = None


def _fingerprint(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _import_av():
    try:
        import av
    except ImportError as e:
        raise ImportError("decoding videos needs PyAV: pip install 'nsfw-safety[video]'") from e
    return av


def probe(path: str | os.PathLike, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """Read a file's header and check it against ``limits``; nothing is decoded.

    Raises:
        VideoTooLarge: the header says the file is over a limit.
        VideoError: missing, not a video or animation, no video stream, or no frame.
    """
    path = Path(path)
    name = repr(str(path))
    if not path.is_file():
        raise VideoError(f"{name} does not exist or is not a file")
    try:
        return _probe_animation(path, name, limits)
    except (Image.UnidentifiedImageError, _NotPillow) as e:
        pillow_error = e
    return _probe_video(path, name, limits, pillow_error)


class _NotPillow(Exception):
    pass


def _probe_animation(path: Path, name: str, limits: VideoLimits) -> VideoInfo:
    fingerprint = _fingerprint(path)
    try:
        with Image.open(path) as im:
            _check_pixels(name, im.width, im.height, limits)
            try:
                n = _inputs.frame_count(im)  # counted by parsing the file, without decoding
            except ValueError as e:  # frames a viewer could show beyond those declared
                raise VideoError(f"{name}: {e}") from e
            _check_frames(name, n, limits)
            return VideoInfo(path, "animation", im.format, im.width, im.height, n, loop=im.info.get("loop"),
                             default_image=bool(getattr(im, "default_image", False)), fingerprint=fingerprint)
    except Image.DecompressionBombError as e:
        raise VideoTooLarge(f"{name} is too large to decode safely: {e}", "pixels") from e
    except (Image.UnidentifiedImageError, VideoError):
        raise
    except Exception as e:  # a header Pillow recognised but cannot parse: let PyAV have a go
        raise _NotPillow(f"{type(e).__name__}: {e}") from e


def _probe_video(path: Path, name: str, limits: VideoLimits, pillow_error: Exception) -> VideoInfo:
    av = _import_av()
    fingerprint = _fingerprint(path)
    try:
        container = av.open(str(path))
    except Exception as e:
        raise VideoError(f"{name} is not a readable animation or video ({pillow_error}; "
                         f"{type(e).__name__}: {e})") from e
    with container:
        if container.format.name not in VIDEO_CONTAINERS:
            raise VideoError(f"{name} is not a readable animation or video ({pillow_error}; "
                             f"its {container.format.name!r} container is not a video format read here: "
                             f"{', '.join(VIDEO_CONTAINERS.values())})")
        if not container.streams.video:
            raise VideoError(f"{name} has no video stream (streams: "
                             f"{', '.join(s.type for s in container.streams) or 'none'})")
        if len(container.streams.video) > 1:  # a player may show any of them, or a cover picture
            raise VideoError(f"{name} has {len(container.streams.video)} video streams (a cover picture counts): "
                             f"only files with one are checked")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        _check_pixels(name, ctx.width, ctx.height, limits)
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000  # AV_TIME_BASE
        if duration is not None and duration > limits.max_duration:
            raise VideoTooLarge(f"{name} plays for {duration:,.1f} s, over the limit of {limits.max_duration:g} s",
                                "duration")
        rate = stream.average_rate or stream.guessed_rate
        n = stream.frames
        if n:
            _check_frames(name, n, limits)
        else:  # WebM says nothing: count the packets (no decoding), stopping past the limit
            n = 0
            for packet in container.demux(stream):
                if packet.size:
                    n += 1
                    if n > limits.max_frames:
                        _check_frames(name, n, limits, "more than ")
        if n == 0:
            raise VideoError(f"{name} has a video stream with no frames")
        return VideoInfo(path, "video", _MUXERS.get(path.suffix.lower(), container.format.name.split(",")[0]),
                         ctx.width, ctx.height, n, fps=float(rate) if rate else None, duration=duration,
                         codec=ctx.name, audio=bool(container.streams.audio), fingerprint=fingerprint)


def _check_pixels(name: str, width: int, height: int, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"{name} has frames of size {width}x{height}")
    if width * height > limits.max_pixels:
        raise VideoTooLarge(f"{name} has frames of {width}x{height} = {width * height:,} pixels, over the "
                            f"limit of {limits.max_pixels:,}", "pixels")


def _check_frames(name: str, n: int, limits: VideoLimits, more: str = "") -> None:
    if n > limits.max_frames:
        raise VideoTooLarge(f"{name} has {more}{n:,} frames, over the limit of {limits.max_frames:,}", "frames")


# --- decoding --------------------------------------------------------------------------------

def read_frames(path: str | os.PathLike, *, limits: VideoLimits = VideoLimits(), select: Select | None = None,
                decoder: str = "auto", device: Any = None, info: VideoInfo | None = None) -> Iterator[Frame]:
    """Every frame of a video or animation, in order, decoded one at a time.

    Args:
        path: the file.
        limits: checked from the header first (see :func:`probe`), then on every frame.
        select: ``select(index, time) -> bool``; frames it rejects are still decoded (later frames
            depend on them) but not converted, and come with ``image=None``. Default: all.
        decoder: ``"auto"`` (Pillow for animations, PyAV for videos), ``"pyav"``, or
            ``"torchcodec"`` (videos only; needs torchcodec installed).
        device: where torchcodec decodes to, e.g. ``"cuda"``; ignored by the other decoders.
        info: the file's :class:`VideoInfo`, if already probed.
    Yields:
        :class:`Frame` objects; ``len`` of them equals ``info.frames`` for an intact file.
    Raises:
        VideoTooLarge, VideoError: from the header (before the first frame), or mid-stream: a
            frame over a limit, a decoding error, or a stream that ends before the frames its
            header announced (a truncated file). The frames yielded before it stand.
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    info = info or probe(path, limits)
    select = select or (lambda index, time: True)
    name = repr(str(info.path))
    if info.kind == "animation":
        if decoder == "torchcodec":
            raise VideoError(f"{name} is an animation ({info.format}): torchcodec decodes videos only")
        frames = _pillow_frames(info, select, limits)
    elif decoder == "torchcodec":
        frames = _torchcodec_frames(info, select, limits, device)
    else:
        frames = _pyav_frames(info, select, limits)
    count = 0
    try:
        for frame in frames:
            count += 1
            yield frame
    except (VideoError, ImportError):
        raise
    except Exception as e:  # decoders raise OSError, EOFError, av.error.*, struct.error ... on bad bytes
        raise VideoError(f"{name}: frame {count} cannot be decoded ({type(e).__name__}: {e})") from e
    if count < info.frames:
        raise VideoError(f"{name}: the stream ended after {count} of the {info.frames} frames its header "
                         f"announces (a truncated file?)")


def _pillow_frames(info: VideoInfo, select: Select, limits: VideoLimits) -> Iterator[Frame]:
    name = repr(str(info.path))
    time = 0.0
    with Image.open(info.path) as im:
        for index in range(info.frames):
            im.seek(index)
            im.load()  # the next seek composes on this frame, so it is decoded either way
            default = index == 0 and info.default_image
            duration = 0.0 if default else im.info.get("duration", 0) / 1000.0
            if time + duration > limits.max_duration:
                raise VideoTooLarge(f"{name} plays for more than {limits.max_duration:g} s, the limit", "duration")
            yield Frame(index, time, duration, im.copy() if select(index, time) else None)
            time += duration


def _pyav_frames(info: VideoInfo, select: Select, limits: VideoLimits) -> Iterator[Frame]:
    av = _import_av()
    name = repr(str(info.path))
    with av.open(str(info.path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            if index >= limits.max_frames:
                raise VideoTooLarge(f"{name} has more than {limits.max_frames:,} frames, the limit", "frames")
            _check_pixels(name, frame.width, frame.height, limits)
            time = _frame_time(frame, stream, index, info.fps)
            if time is not None and time > limits.max_duration:
                raise VideoTooLarge(f"{name} plays for more than {limits.max_duration:g} s, the limit", "duration")
            duration = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else (
                1 / info.fps if info.fps else None)
            image = _upright(frame.to_ndarray(format="rgb24"), frame.rotation) if select(index, time) else None
            yield Frame(index, time, duration, image)


def _rotation(path: Path) -> int:
    """The display rotation of a video's first frame, in degrees counterclockwise."""
    av = _import_av()
    with av.open(str(path)) as container:
        return next(container.decode(container.streams.video[0])).rotation or 0


def _upright(rgb: np.ndarray, rotation: int | float, back: bool = False) -> np.ndarray:
    """A stored frame as players show it: turned by its display matrix's rotation (degrees
    counterclockwise, to the nearest quarter turn); ``back=True`` turns it back."""
    turns = round((rotation or 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, -turns if back else turns)) if turns else rgb


def _frame_time(frame: Any, stream: Any, index: int, fps: float | None) -> float | None:
    """Seconds from the stream's start; from the frame rate if the frame has no timestamp."""
    if frame.pts is not None and frame.time_base is not None:
        return float((frame.pts - (stream.start_time or 0)) * frame.time_base)
    return index / fps if fps else None


def _torchcodec_frames(info: VideoInfo, select: Select, limits: VideoLimits, device: Any,
                       batch: int = 32) -> Iterator[Frame]:
    """Frames decoded by torchcodec (on ``device``, e.g. CUDA), the selected ones in batches.

    torchcodec applies the display rotation itself (0.17). ``select`` and the frames not selected
    get the nominal time ``index / fps``; the selected frames come with their own timestamps.
    """
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError as e:
        raise ImportError("decoder='torchcodec' needs torchcodec: pip install torchcodec "
                          "(and FFmpeg's shared libraries: see link_pyav_ffmpeg)") from e
    try:
        decoder = VideoDecoder(str(info.path), device=device or "cpu", num_ffmpeg_threads=0)
    except RuntimeError as e:
        if not str(e).startswith("Could not load libtorchcodec"):
            raise
        raise ImportError("decoder='torchcodec': torchcodec cannot load FFmpeg's shared libraries (versions 4 "
                          "to 9); PyAV's can serve: see nsfw_safety.frames.link_pyav_ffmpeg") from None
    meta = decoder.metadata
    n, fps = meta.num_frames or info.frames, meta.average_fps or info.fps
    _check_frames(repr(str(info.path)), n, limits)
    start = meta.begin_stream_seconds or 0.0
    times = [i / fps if fps else None for i in range(n)]
    duration = 1 / fps if fps else None
    wanted = [i for i in range(n) if select(i, times[i])]
    done = 0
    for first in range(0, len(wanted), batch):
        part = wanted[first : first + batch]
        frames = decoder.get_frames_at(part)  # data: (N, 3, H, W) uint8 on the device
        for index, image, pts, length in zip(part, frames.data, frames.pts_seconds.tolist(),
                                             frames.duration_seconds.tolist()):
            yield from (Frame(i, times[i], duration) for i in range(done, index))
            yield Frame(index, pts - start, length, image)
            done = index + 1
    yield from (Frame(i, times[i], duration) for i in range(done, n))


def link_pyav_ffmpeg(folder: str | os.PathLike) -> Path:
    """Make PyAV's bundled FFmpeg loadable by torchcodec: ``folder`` gets a link to each library
    of PyAV's wheel (``av.libs``) under its own name, and to FFmpeg's seven under the names
    torchcodec asks for (``libavcodec-1a2b3c4d.so.62.28.100`` is also ``libavcodec.so.62``; the
    others keep only their unique names, so they shadow nothing). Start the process that uses
    torchcodec with ``LD_LIBRARY_PATH=folder`` (the loader reads it only at start-up).

    Returns:
        ``folder``, absolute.
    Raises:
        FileNotFoundError: PyAV is not installed from a wheel that bundles its libraries.
    """
    import re

    av = _import_av()
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    if not libs.is_dir():
        raise FileNotFoundError(f"PyAV's bundled libraries are not in {str(libs)!r} (a PyAV built from source "
                                f"uses the system's FFmpeg, which torchcodec finds by itself)")
    folder = Path(os.path.abspath(folder))
    folder.mkdir(parents=True, exist_ok=True)
    for lib in libs.iterdir():
        soname = re.fullmatch(r"(libav\w+|libsw\w+)-[0-9a-f]{8}(\.so\.\d+).*", lib.name)
        for name in {lib.name, "".join(soname.groups()) if soname else lib.name}:
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(lib)
    return folder


# --- censored copies -------------------------------------------------------------------------

def write_censored(source: str | os.PathLike, result: Any, target: str | os.PathLike, guard: Any, *,
                   overwrite: bool = False, max_bytes: int = 2 << 30) -> Path:
    """Write a copy of ``source`` with the frames ``result`` censors censored, in the same format.

    In region mode (``guard.regions``) each censored frame is censored in the regions found in
    its own pixels, whole where none is found; frames whose check failed (``result.failed``) are
    filled whole.

    Args:
        source: the checked file.
        result: its :class:`nsfw_safety.video.VideoResult` (from ``check_video(source, guard)``).
        target: the new file; it must keep the source's suffix and must not be the source.
        guard: the :class:`~nsfw_safety.SafetyFilter` whose censoring (action, strengths) to apply.
        overwrite: replace ``target`` if it exists (never the source).
        max_bytes: animations are written by Pillow, which holds every frame; refuse an animation
            whose frames would take more than this as RGBA.
    Returns:
        ``target``. Videos keep their container, codec (re-encoded; frames not censored are
        re-encoded from their decoded pixels, without an RGB round trip), every frame's
        timestamp, and their audio (copied packet for packet). Animations keep every frame
        (identical neighbours too), its duration and the loop count (WebP is written lossless).
    Raises:
        ValueError: the result is not for this file, the file changed since it was checked, the
            check did not finish (no copy is made of frames never checked), or a bad target.
        FileExistsError: ``target`` exists and ``overwrite`` is False.
    """
    source, target = Path(source), Path(target)
    info = getattr(result, "source", None)
    if info is None or Path(info.path).resolve() != source.resolve():
        raise ValueError(f"the result is not for {str(source)!r}: pass the VideoResult of check_video on this file")
    if _fingerprint(source) != info.fingerprint:
        raise ValueError(f"{str(source)!r} changed since it was checked: check it again")
    if result.error is not None:
        raise ValueError(f"{str(source)!r} was not fully checked ({result.reason}): no censored copy is made")
    if target.suffix.lower() != source.suffix.lower():
        raise ValueError(f"target {str(target)!r} must keep the source's suffix {source.suffix!r}")
    if target.resolve() == source.resolve() or (target.exists() and target.samefile(source)):
        raise ValueError(f"target {str(target)!r} is the source: a censored copy never replaces its input")
    if target.exists() and not overwrite:
        raise FileExistsError(f"target {str(target)!r} exists (pass overwrite=True to replace it)")
    actions = dict(result.actions)
    failed = frozenset(result.failed)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(fd)
    try:
        if info.kind == "animation":
            _write_animation(info, actions, Path(tmp), guard, max_bytes, failed)
        else:
            _write_video(info, actions, Path(tmp), guard, failed=failed)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            os.link(tmp, target)  # fails if target appeared meanwhile: nothing is clobbered
            os.unlink(tmp)
        _fsync_dir(target.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def censor_frames(images: list[Any], actions: list[str], guard: Any, *, search: Sequence[int] = ()) -> list[Any]:
    """Censor decoded frames with ``guard``'s censoring: the one censor and restore path.

    Args:
        images: PIL images, or (H, W, 3) uint8 arrays of one size.
        actions: one per image (``"blur"``, ``"black"``, ...; ``"none"`` leaves it).
        search: region mode: the images to censor in their regions (see
            :meth:`~nsfw_safety.SafetyFilter.censor`); the others are censored whole.
    Returns:
        The images, censored ones replaced, in the same kind (PIL mode, array dtype).
    """
    return list(censor_decoded(images, actions, guard, search=search).images)


def censor_decoded(images: list[Any], actions: list[str], guard: Any, *, search: Sequence[int] = ()) -> Any:
    """:func:`censor_frames`, with what region mode found: a :class:`~nsfw_safety.filter.Censored`
    (``images`` in the input's kind, ``regions`` and ``notes`` per image)."""
    batch = np.stack(images) if isinstance(images[0], np.ndarray) else images
    prepared = _inputs.prepare(batch, layout="BHWC" if isinstance(batch, np.ndarray) else None,
                               device=guard.detector.device)
    return guard.censor(prepared, actions, search=search)


def _write_animation(info: VideoInfo, actions: dict[int, str], tmp: Path, guard: Any, max_bytes: int,
                     failed: frozenset[int] = frozenset()) -> None:
    if info.format not in ANIMATION_WRITERS:
        raise ValueError(f"cannot write a censored {info.format} animation (only {', '.join(ANIMATION_WRITERS)})")
    need = info.frames * info.width * info.height * 4
    if need > max_bytes:
        raise VideoTooLarge(f"a censored copy of {str(info.path)!r} ({info.frames} frames of "
                            f"{info.width}x{info.height}) needs {need / 2**30:.1f} GiB, over max_bytes")
    images, durations = [], []
    for frame in read_frames(info.path, info=info):
        images.append(frame.image)
        durations.append(frame.duration * 1000)  # ms; an APNG's may be fractions
    index = [i for i in range(len(images)) if actions.get(i, "none") != "none"]
    if index:
        search = [k for k, i in enumerate(index) if i not in failed]
        for i, image in zip(index, censor_frames([images[i] for i in index], [actions[i] for i in index], guard,
                                                 search=search)):
            images[i] = image
    if info.format == "GIF":
        _save_gif(images, durations, info.loop, tmp)
    elif info.format == "WEBP":
        _save_webp(images, durations, 0 if info.loop is None else info.loop, tmp)
    else:
        _save_apng(images, durations, info.loop, info.default_image, tmp)


# Pillow's multi-frame writers merge a frame identical to the one before into it (summing their
# durations): a clip censored to black would come out as one frame. GIF and libwebp have no option
# against it, so those two files are assembled here from Pillow's single-frame encodings; Pillow's
# APNG writer only merges frames with the same disposal, so it gets alternating ones.

def _save_apng(images: list[Image.Image], durations: list[float], loop: int | None, default_image: bool,
               tmp: Path) -> None:
    """Every frame kept: consecutive frames alternate between disposals NONE and BACKGROUND.

    Pillow encodes each frame against the previous canvas after its disposal, so what a viewer
    sees does not change; frames are written with blend SOURCE (Pillow's default).
    """
    from PIL.PngImagePlugin import Disposal

    if default_image:
        durations = durations[1:]  # the default image has no place in the timeline
    disposal = [Disposal.OP_BACKGROUND if i % 2 else Disposal.OP_NONE for i in range(len(durations))]
    options: dict[str, Any] = {"default_image": default_image} if default_image else {}
    if loop is not None:
        options["loop"] = loop
    images[0].save(tmp, format="PNG", save_all=True, append_images=images[1:], duration=durations,
                   disposal=disposal, **options)


def _gif_blocks(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """A GIF's (signature + screen descriptor, global colour table, [(label, block)]), where an
    extension's label is its byte after ``!`` and an image's is ``,`` (block: descriptor to data)."""
    screen, pos = data[:13], 13
    flags = data[10]
    table = data[pos : pos + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)]
    pos += len(table)
    blocks = []
    while data[pos : pos + 1] not in (b";", b""):
        start = pos
        if data[pos : pos + 1] == b"!":
            label, pos = data[pos + 1 : pos + 2], pos + 2
        else:
            image_flags = data[pos + 9]
            label, pos = b",", pos + 10 + (3 << ((image_flags & 7) + 1) if image_flags & 0x80 else 0) + 1
        while data[pos]:  # data sub-blocks, up to the empty one
            pos += data[pos] + 1
        pos += 1
        blocks.append((label, data[start:pos]))
    return screen, table, blocks


def _save_gif(images: list[Image.Image], durations: list[float], loop: int | None, tmp: Path) -> None:
    """An animated GIF of full-canvas frames, each with its own colour table and its duration
    (in the format's 10 ms steps); each is disposed to the background, so its transparent pixels
    show nothing of the frame before, as in the frames decoded."""
    with open(tmp, "wb") as out:
        for i, (image, duration) in enumerate(zip(images, durations)):
            encoded = io.BytesIO()
            image.save(encoded, format="GIF", duration=round(duration), disposal=2, interlace=False)
            screen, table, blocks = _gif_blocks(encoded.getvalue())
            if i == 0:
                out.write(b"GIF89a" + screen[6:] + table)
                if loop is not None:
                    out.write(b"!\xff\x0bNETSCAPE2.0\x03\x01" + loop.to_bytes(2, "little") + b"\x00")
            for label, block in blocks:
                if label == b"\xf9":  # the graphic control extension: duration, disposal, transparency
                    out.write(block)
                elif label == b",":
                    if i and not block[9] & 0x80:  # its colours were the global table: make them local
                        block = block[:9] + bytes([block[9] | 0x80 | (screen[10] & 7)]) + table + block[10:]
                    out.write(block)
        out.write(b";")


def _riff_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """A RIFF file's chunks as (fourcc, the whole chunk with its header and padding)."""
    pos = 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        end = pos + 8 + size + (size & 1)
        yield data[pos : pos + 4], data[pos:end]
        pos = end


def _save_webp(images: list[Image.Image], durations: list[float], loop: int, tmp: Path) -> None:
    """An animated WebP of full-canvas lossless frames, each replacing the canvas (no blending, no
    disposal) for its duration in ms; the frames are Pillow's still encodings."""
    width, height = images[0].size
    alpha = any(image.has_transparency_data for image in images)
    body = [b"VP8X" + (10).to_bytes(4, "little") + bytes([0x12 if alpha else 0x02, 0, 0, 0])
            + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little"),
            b"ANIM" + (6).to_bytes(4, "little") + bytes(4) + loop.to_bytes(2, "little")]
    for image, duration in zip(images, durations):
        encoded = io.BytesIO()
        image.save(encoded, format="WEBP", lossless=True, exact=True)
        bitstream = b"".join(chunk for fourcc, chunk in _riff_chunks(encoded.getvalue())
                             if fourcc in (b"ALPH", b"VP8 ", b"VP8L"))
        header = (bytes(6) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
                  + round(duration).to_bytes(3, "little") + b"\x02")  # at (0, 0); do not blend, do not dispose
        frame = header + bitstream  # of even length: the chunks it holds are padded
        body.append(b"ANMF" + len(frame).to_bytes(4, "little") + frame)
    data = b"".join(body)
    with open(tmp, "wb") as out:
        out.write(b"RIFF" + (len(data) + 4).to_bytes(4, "little") + b"WEBP" + data)


def _write_video(info: VideoInfo, actions: dict[int, str], tmp: Path, guard: Any, chunk: int = 32,
                 failed: frozenset[int] = frozenset()) -> None:
    av = _import_av()
    with av.open(str(info.path)) as src, av.open(str(tmp), "w", format=_MUXERS.get(info.path.suffix.lower())) as dst:
        vin = src.streams.video[0]
        codec = _ENCODERS.get(vin.codec_context.name, vin.codec_context.name)
        vout = dst.add_stream(codec, rate=vin.average_rate or vin.guessed_rate or Fraction(25))
        vout.width, vout.height = vin.codec_context.width, vin.codec_context.height
        vout.pix_fmt = vin.codec_context.pix_fmt or "yuv420p"
        # the input's time base, so that every frame keeps its timestamp (variable frame rates too)
        vout.time_base = vout.codec_context.time_base = vin.time_base
        rotation = _rotation(info.path)  # the display matrix goes in before any packet is written
        if rotation:
            vout.set_display_rotation(rotation)
        audio = {s.index: dst.add_stream_from_template(s) for s in src.streams.audio}
        pending: list[Any] = []

        def flush() -> None:
            index = [i for i, (n, _) in enumerate(pending) if actions.get(n, "none") != "none"]
            if index:
                # censored as shown (a placeholder card stays upright), stored as before
                rgb = [_upright(pending[i][1].to_ndarray(format="rgb24"), rotation) for i in index]
                censored = censor_frames(rgb, [actions[pending[i][0]] for i in index], guard,
                                         search=[k for k, i in enumerate(index) if pending[i][0] not in failed])
                for i, image in zip(index, censored):
                    old = pending[i][1]
                    image = _upright(image, rotation, back=True)
                    new = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=vout.pix_fmt)
                    new.pts, new.time_base = old.pts, old.time_base
                    pending[i] = (pending[i][0], new)
            for _, frame in pending:
                if (frame.width, frame.height) != (vout.width, vout.height):
                    frame = frame.reformat(width=vout.width, height=vout.height)
                frame.pict_type = av.video.frame.PictureType.NONE  # let the encoder choose frame types
                dst.mux(vout.encode(frame))
            pending.clear()

        index = 0
        for packet in src.demux(vin, *[src.streams[i] for i in audio]):
            if packet.stream.type == "audio":
                if packet.dts is not None:
                    packet.stream = audio[packet.stream.index]
                    dst.mux(packet)
                continue
            for frame in packet.decode():
                pending.append((index, frame))
                index += 1
                if len(pending) == chunk:
                    flush()
        flush()
        dst.mux(vout.encode())
