"""Small animations and videos written by the tests: Pillow writes GIF, WebP and APNG (so does
PyAV, keeping identical consecutive frames); PyAV writes MP4, MOV and WebM (H.264, VP9), with an
audio track when asked."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from images import synthetic

SIZE = (48, 64)  # (h, w)
VIDEO_CODECS = {".mp4": "libx264", ".mov": "libx264", ".webm": "libvpx-vp9"}
AUDIO_CODECS = {".mp4": "aac", ".mov": "aac", ".webm": "libopus"}


def pictures(n: int, size: tuple[int, int] = SIZE, seed: int = 0) -> list[Image.Image]:
    """``n`` different RGB frames (gradients, noise, checkerboards, ...): their scores spread."""
    return [synthetic(seed + i, size) for i in range(n)]


def write_animation(path: Path, frames: list[Image.Image], durations: list[int], loop: int | None = 0,
                    **options) -> Path:
    """An animated GIF, WebP or APNG (by suffix); ``durations`` in ms; ``default_image=True`` makes
    frame 0 an APNG default image outside the animation (then ``durations`` has one entry less)."""
    if loop is not None:
        options["loop"] = loop
    if path.suffix == ".webp":
        options.setdefault("lossless", True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, **options)
    return path


#: FFmpeg's muxer, encoder, pixel format, loop option and time base for each animation suffix.
_FFMPEG_ANIMATIONS = {".gif": ("gif", "gif", "rgb8", "loop", 100), ".webp": ("webp", "libwebp", "bgra", "loop", 1000),
                      ".png": ("apng", "apng", "rgba", "plays", 1000)}


def write_animation_ffmpeg(path: Path, frames: list[np.ndarray], durations: list[int], loop: int = 0) -> Path:
    """An animated GIF, WebP or APNG written by FFmpeg (PyAV), which keeps identical consecutive
    frames (Pillow's writers merge them). ``frames``: (H, W, 3) uint8 RGB (or RGBA
    for WebP and APNG); ``durations`` in ms (GIF: multiples of 10); the muxer decides the last frame's duration. GIF colours are reduced
    to 3-3-2 bits."""
    import av

    muxer, codec, pix_fmt, loop_option, rate = _FFMPEG_ANIMATIONS[path.suffix]
    with av.open(str(path), "w", format=muxer, options={loop_option: str(loop)}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.codec_context.time_base = Fraction(1, rate)
        if codec == "libwebp":
            stream.codec_context.options = {"lossless": "1"}
        pts = 0
        for frame, duration in zip(frames, durations):
            out = av.VideoFrame.from_ndarray(frame, format="rgba" if frame.shape[2] == 4 else "rgb24")
            out = out.reformat(format=pix_fmt)
            out.pts, out.time_base = pts, Fraction(1, rate)
            pts += duration * rate // 1000
            container.mux(stream.encode(out))
        container.mux(stream.encode())
    return path


def write_video(path: Path, frames: list[np.ndarray] | list[Image.Image], *, rate: int = 8, audio: bool = True,
                pts: list[int] | None = None, faststart: bool = False, rotation: int = 0, streams: int = 1) -> Path:
    """A video of RGB ``frames`` at ``rate`` frames per second (or at ``pts`` in 1/rate units: a
    variable frame rate), with a second of silence per ``rate`` frames as audio when asked;
    ``rotation``: a display matrix (degrees counterclockwise); ``streams``: that many copies of
    the video stream."""
    import av

    suffix = path.suffix
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        videos = [container.add_stream(VIDEO_CODECS[suffix], rate=rate) for _ in range(streams)]
        first = np.asarray(frames[0])
        for stream in videos:
            stream.height, stream.width = first.shape[:2]
            stream.pix_fmt = "yuv420p"
            stream.codec_context.time_base = Fraction(1, rate)
            if rotation:
                stream.set_display_rotation(rotation)
        sound = container.add_stream(AUDIO_CODECS[suffix], rate=48000, layout="mono") if audio else None
        for stream in videos:
            for i, frame in enumerate(frames):
                out = av.VideoFrame.from_ndarray(np.asarray(frame), format="rgb24")
                out.pts, out.time_base = (pts[i] if pts else i), Fraction(1, rate)
                container.mux(stream.encode(out))
            container.mux(stream.encode())
        if sound is not None:
            fmt = sound.codec_context.format
            samples = np.zeros((1, 48000 * len(frames) // rate), np.int16 if fmt.name.startswith("s16") else np.float32)
            silence = av.AudioFrame.from_ndarray(samples, format=fmt.name, layout="mono")
            silence.sample_rate = 48000
            container.mux(sound.encode(silence))
            container.mux(sound.encode())
    return path


def write_audio_only(path: Path) -> Path:
    """An MP4 with one AAC audio stream and no video."""
    import av

    with av.open(str(path), "w") as container:
        sound = container.add_stream("aac", rate=48000, layout="mono")
        silence = av.AudioFrame.from_ndarray(np.zeros((1, 48000), np.float32), format=sound.codec_context.format.name,
                                             layout="mono")
        silence.sample_rate = 48000
        container.mux(sound.encode(silence))
        container.mux(sound.encode())
    return path
