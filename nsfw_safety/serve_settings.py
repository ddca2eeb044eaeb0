"""The HTTP service's settings and its ``serve`` flags, importable without torch or fastapi.

Each setting has a flag and an ``NSFW_SAFETY_*`` variable (:data:`ENV`); ``nsfw-safety serve
--help`` and bad settings answer from here before any model or web library is imported. The
second-opinion and region options are the ones ``scan`` takes (:mod:`nsfw_safety.options`).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Mapping

from .options import ENV_PARSERS, REGION_FLAGS, SECOND_OPINION_FLAGS, check_regions, check_second_opinion
from .vocabulary import DEFAULT_LEVEL, DEFAULT_THRESHOLD, MIN_SCORE, NSFW_LEVELS, check_threshold, level_index

if TYPE_CHECKING:
    from .regions.settings import RegionSettings

#: Formats the server can accept, by media type: the PIL decoder each image is read with, or the
#: video container (read with PyAV). PNG, WebP and GIF files may be animations (APNG included).
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/gif": "GIF",
           "video/mp4": "MP4", "video/quicktime": "MOV", "video/webm": "WEBM"}
#: The formats of ``FORMATS`` that are videos (the rest are images, still or animated).
VIDEO_FORMATS = ("MP4", "MOV", "WEBM")


@dataclass(frozen=True)
class Settings:
    """How the service runs. Each field has a flag and an environment variable (``ENV``).

    Attributes:
        model: registry name, hub id or local checkpoint directory.
        revision, device, dtype: as for :func:`nsfw_safety.load_detector` (None: its defaults).
        second_opinion: a second model (as ``model``) that re-checks the images whose first score
            at ``level`` is in ``band`` (:func:`nsfw_safety.cascade.second_opinion`); None: one model.
        band: (lo, hi), bounds included; None: (``threshold``, 1), every image the first flags.
        combine: ``override`` (default), ``mean`` or ``max`` where the second scored; ``any`` or
            ``all``: both models on every image (no band).
        level, threshold: the default policy; a request may override both.
        lock_policy: requests may only make the policy stricter (a lower level or threshold);
            a looser one is refused with 403.
        api_key: when set, ``/compute*`` needs it (``Authorization: Bearer`` or ``X-API-Key``).
        max_batch_size: most images scored together on the device.
        max_wait_ms: how long the first queued image waits for others to join its batch.
        max_upload_bytes: largest accepted file, in bytes.
        max_pixels: largest accepted image or frame, width * height, checked before decoding.
        max_frames: most frames in an animation or video; every one is checked.
        max_duration: longest playing time of an animation or video, in seconds.
        max_pixels_in_flight: most decoded pixels held at once, over all requests (None:
            4 * ``max_pixels``); each upload reserves its width * height before decoding, an
            animation or video the frames of one scored chunk plus 2 (the decoder's own).
        busy_timeout: seconds an upload waits for room in that budget before a 503.
        max_files: most images in one ``/compute/batch`` request.
        content_types: accepted formats (read from the bytes), a subset of ``FORMATS``; the video
            types need PyAV (the ``video`` extra).
        header_timeout: seconds a connection has to send its request headers.
        body_timeout: seconds a request has to send its body, once its headers are in.
        max_connections: most open connections and requests; beyond it uvicorn answers 503.
        regions: region mode, off when None: the region classes (a set such as ``"exposed"`` or
            ``"faces"``, or class names). Flagged images are then censored in their regions only
            (whole when none is found), and every result lists the regions of a flagged image.
        region_model: the region detector's ``.onnx`` file (None: the installed nudenet model).
        region_threshold, region_expand: one number, or a mapping class -> number (see
            :class:`~nsfw_safety.regions.RegionSettings`).
        region_shape, region_feather: the mask's shape and soft edge.
    """

    model: str = "eva"
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    second_opinion: str | None = None
    band: tuple[float, float] | None = None
    combine: str | None = None
    level: str = DEFAULT_LEVEL
    threshold: float = DEFAULT_THRESHOLD
    lock_policy: bool = False
    api_key: str | None = field(default=None, repr=False)
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096  # 50 MB once decoded to RGB
    max_frames: int = 1000
    max_duration: float = 60.0
    max_pixels_in_flight: int | None = None
    busy_timeout: float = 10.0
    max_files: int = 16
    content_types: tuple[str, ...] = tuple(FORMATS)
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_connections: int = 64
    regions: str | tuple[str, ...] | None = None
    region_model: str | None = None
    region_threshold: float | Mapping[str, float] = MIN_SCORE
    region_expand: float | Mapping[str, float] = 0.0
    region_shape: str = "rectangle"
    region_feather: float = 0.0

    def __post_init__(self) -> None:
        level_index(self.level)
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        if self.device is not None or self.dtype is not None:
            import torch  # only when a device or dtype is set: --help stays free of it

            from .detector import resolve_dtype
            if self.device is not None:
                try:
                    torch.device(self.device)
                except (RuntimeError, TypeError):
                    raise ValueError(f"device must be a torch device such as 'cuda' or 'cpu', got {self.device!r}") from None
            if self.dtype is not None:
                resolve_dtype(self.dtype, torch.device("cpu"))
        object.__setattr__(self, "band", check_second_opinion(self.second_opinion, self.band, self.combine))
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string")
        if self.max_pixels_in_flight is None:
            object.__setattr__(self, "max_pixels_in_flight", 4 * self.max_pixels)
        for name in ("max_batch_size", "max_upload_bytes", "max_pixels", "max_pixels_in_flight", "max_frames",
                     "max_files", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_pixels_in_flight < self.max_pixels:
            raise ValueError(f"max_pixels_in_flight ({self.max_pixels_in_flight:,}) must be at least "
                             f"max_pixels ({self.max_pixels:,}), or the largest image could never be decoded")
        for name, top in (("max_wait_ms", 10_000), ("busy_timeout", 3600), ("header_timeout", 3600),
                          ("body_timeout", 3600), ("max_duration", 24 * 3600)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= top):
                raise ValueError(f"{name} must be in [0, {top}], got {value!r}")
        if not self.max_duration > 0:
            raise ValueError(f"max_duration must be > 0 seconds, got {self.max_duration!r}")
        types = tuple(self.content_types)
        unknown = [t for t in types if t not in FORMATS]
        if not types or unknown:
            raise ValueError(f"content_types must be a non-empty subset of {tuple(FORMATS)}, got {types!r}")
        object.__setattr__(self, "content_types", types)
        check_regions(self.regions, self.region_model, self.region_threshold, self.region_expand,
                      self.region_shape, self.region_feather)

    def region_settings(self) -> "RegionSettings | None":
        """The region settings (the region model loaded), or None when region mode is off."""
        if self.regions is None:
            return None
        from .regions.settings import RegionSettings

        return RegionSettings(self.region_model, self.regions, self.region_threshold, self.region_expand,
                              self.region_shape, self.region_feather)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, **overrides: Any) -> "Settings":
        """Defaults, then ``NSFW_SAFETY_*`` variables from ``env``, then ``overrides`` that are not None.

        Raises:
            ValueError: a variable that does not parse, naming it.
        """
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = ENV[f.name]
            if env.get(var, "").strip():
                raw = env[var].strip()
                try:
                    values[f.name] = _PARSE.get(f.name, str)(raw)
                except ValueError as e:
                    raise ValueError(f"{var}={raw!r}: {e}") from None
            if overrides.get(f.name) is not None:
                values[f.name] = overrides[f.name]
        return cls(**values)


def _split(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false (1/0, yes/no, on/off)")


ENV = {
    "model": "NSFW_SAFETY_MODEL", "revision": "NSFW_SAFETY_REVISION", "device": "NSFW_SAFETY_DEVICE",
    "dtype": "NSFW_SAFETY_DTYPE", "level": "NSFW_SAFETY_LEVEL", "threshold": "NSFW_SAFETY_THRESHOLD",
    "second_opinion": "NSFW_SAFETY_SECOND_OPINION", "band": "NSFW_SAFETY_BAND", "combine": "NSFW_SAFETY_COMBINE",
    "lock_policy": "NSFW_SAFETY_LOCK_POLICY", "api_key": "NSFW_SAFETY_API_KEY",
    "max_batch_size": "NSFW_SAFETY_MAX_BATCH", "max_wait_ms": "NSFW_SAFETY_MAX_WAIT_MS",
    "max_upload_bytes": "NSFW_SAFETY_MAX_UPLOAD_BYTES", "max_pixels": "NSFW_SAFETY_MAX_PIXELS",
    "max_frames": "NSFW_SAFETY_MAX_FRAMES", "max_duration": "NSFW_SAFETY_MAX_DURATION",
    "max_pixels_in_flight": "NSFW_SAFETY_MAX_PIXELS_IN_FLIGHT", "busy_timeout": "NSFW_SAFETY_BUSY_TIMEOUT",
    "max_files": "NSFW_SAFETY_MAX_FILES", "content_types": "NSFW_SAFETY_CONTENT_TYPES",
    "header_timeout": "NSFW_SAFETY_HEADER_TIMEOUT", "body_timeout": "NSFW_SAFETY_BODY_TIMEOUT",
    "max_connections": "NSFW_SAFETY_MAX_CONNECTIONS", "regions": "NSFW_SAFETY_REGIONS",
    "region_model": "NSFW_SAFETY_REGION_MODEL", "region_threshold": "NSFW_SAFETY_REGION_THRESHOLD",
    "region_expand": "NSFW_SAFETY_REGION_EXPAND", "region_shape": "NSFW_SAFETY_REGION_SHAPE",
    "region_feather": "NSFW_SAFETY_REGION_FEATHER",
}
_PARSE = {"threshold": float, "max_wait_ms": float, "max_batch_size": int, "max_upload_bytes": int,
          "max_pixels": int, "max_frames": int, "max_duration": float, "max_pixels_in_flight": int,
          "busy_timeout": float, "max_files": int,
          "content_types": _split, "lock_policy": _bool, "header_timeout": float, "body_timeout": float,
          "max_connections": int, **ENV_PARSERS}




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags. Each defaults to its ``NSFW_SAFETY_*`` variable, then to ``Settings``."""
    d = Settings()

    def flag(name: str, dest: str, help: str, shown: str | None = None, **kw) -> None:
        default = getattr(d, dest) if shown is None else shown
        shown = "" if default is None else f"; default {','.join(default) if isinstance(default, tuple) else default}"
        parser.add_argument(name, dest=dest, default=None, help=f"{help} [env {ENV[dest]}{shown}]", **kw)

    flag("--model", "model", "registry name (eva, vit-sd, vit, falconsai), hub id or checkpoint directory")
    flag("--revision", "revision", "hub revision (branch, tag or commit)")
    flag("--device", "device", "torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    flag("--dtype", "dtype", "bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    for f in SECOND_OPINION_FLAGS:
        flag(f.name, f.dest, f.help + (" (env: 'LO,HI')" if f.dest == "band" else ""), **f.kwargs)
    flag("--level", "level", "default level", choices=NSFW_LEVELS)
    flag("--threshold", "threshold", "default threshold in [0, 1]", type=float)
    flag("--lock-policy", "lock_policy", "requests may only make the policy stricter (lower level or threshold); "
                                         "looser ones get 403", action="store_true")
    flag("--api-key", "api_key", "require this key on /compute* (Authorization: Bearer KEY or X-API-Key: KEY); "
                                 "prefer the variable, flags show in ps", metavar="KEY")
    flag("--max-batch", "max_batch_size", "most images scored together", type=int)
    flag("--max-wait-ms", "max_wait_ms", "how long an image waits for others to join its batch", type=float)
    flag("--max-upload-bytes", "max_upload_bytes", "largest accepted file", type=int)
    flag("--max-pixels", "max_pixels", "largest accepted image or video frame (width * height)", type=int)
    flag("--max-frames", "max_frames", "most frames in an animation or video (each is checked)", type=int)
    flag("--max-duration", "max_duration", "longest animation or video, in seconds of playing time", type=float)
    flag("--max-pixels-in-flight", "max_pixels_in_flight", "most decoded pixels held at once, over all requests",
         shown="4 * max-pixels", type=int)
    flag("--busy-timeout", "busy_timeout", "seconds an upload waits for room in --max-pixels-in-flight before a 503",
         type=float)
    flag("--max-files", "max_files", "most images in one /compute/batch request", type=int)
    flag("--content-types", "content_types", "accepted formats as media types, comma-separated (read from the bytes)",
         type=_split)
    flag("--header-timeout", "header_timeout", "seconds a connection has to send its request headers", type=float)
    flag("--body-timeout", "body_timeout", "seconds a request has to send its body", type=float)
    flag("--max-connections", "max_connections", "most open connections; beyond it new requests get 503", type=int)
    for f in REGION_FLAGS:
        flag(f.name, f.dest, f.help, shown="off" if f.dest == "regions" else None, **f.kwargs)
    parser.add_argument("--host", default=None, help="address to listen on [env NSFW_SAFETY_HOST; default 127.0.0.1]")
    parser.add_argument("--port", default=None, type=int, help="port [env NSFW_SAFETY_PORT; default 8000]")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="log level [default info]")


def from_args(args: argparse.Namespace) -> tuple[Settings, str, int]:
    """The settings, host and port of parsed ``serve`` flags, their variables filling the gaps.

    Raises:
        ValueError: a setting or variable that does not parse or is out of range, naming it.
    """
    settings = Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})
    host = args.host or os.environ.get("NSFW_SAFETY_HOST", "").strip() or "127.0.0.1"
    port = args.port
    if port is None:
        raw = os.environ.get("NSFW_SAFETY_PORT", "").strip() or "8000"
        if not raw.isdigit():
            raise ValueError(f"NSFW_SAFETY_PORT={raw!r}: expected a port number")
        port = int(raw)
    return settings, host, port

