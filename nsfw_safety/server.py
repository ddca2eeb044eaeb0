"""HTTP service: an image in, scores out, a censored image on request, batched under load.

    pip install -e ".[server]"          # from a clone; see the README's Install section
    nsfw-safety serve --model eva --host 127.0.0.1 --port 8000

Routes: ``POST /compute`` (one image), ``POST /compute/batch`` (several), ``GET /health``,
``GET /ready``, ``GET /docs`` (Swagger UI served from the package, no CDN). Every request runs
the library's one path: uploads are decoded in worker threads, queued, scored together by
:class:`Batcher` (one ``Detector.predict`` per batch), judged by each request's own
:class:`~nsfw_safety.levels.Policy`, and censored by a :class:`~nsfw_safety.filter.SafetyFilter`
fed those same scores.

The boundary, in the order a request meets it:

* connection: request headers must arrive within ``header_timeout`` (:func:`uvicorn_config`);
* ``/compute*``: the API key, if one is set, and a loaded model, before any of the body is read;
* body: at most ``max_files * (max_upload_bytes + 64 KiB)`` bytes, all there within
  ``body_timeout`` (:class:`_BodyGuard`); multipart parts are bounded while they stream in, so an
  oversized file costs no temp disk (:class:`_BoundedMultiPart`);
* each file: its format read from its bytes, never from the declared type; its pixel count read
  from its header, and reserved from a budget shared by all requests (:class:`PixelBudget`)
  before it is decoded.

Errors are JSON ``{"error": code, "detail": message}``: 4xx for every bad request or upload,
503 while the model loads, when the service is busy or when scoring fails (never an answer of
"safe"). ``/compute/batch`` answers each file: a bad file gets an error entry in its slot.

This module imports fastapi (the ``server`` extra); nothing else in the package imports it.
"""

import argparse
import asyncio
import base64
import collections
import contextlib
import functools
import hmac
import io
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import IO, Annotated, Any, Literal, Mapping, Sequence

import torch
from fastapi import APIRouter, FastAPI, File, Query, Request, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser

from .cascade import BANDLESS, RULES, second_opinion
from .detector import Detector, load_detector, resolve_dtype
from .filter import SafetyFilter
from .inputs import ImageTooLarge, MultiFrameImage, open_image, plain
from .censor import HIDING_ACTIONS
from .levels import DEFAULT_LEVEL, DEFAULT_THRESHOLD, NSFW_LEVELS, Policy, check_threshold, level_index
from .regions.detector import MIN_SCORE, NUDENET_LABELS, _class_indices, _per_class
from .regions.mask import SHAPES
from .regions.settings import RegionSettings, parse_classes, parse_per_class

log = logging.getLogger(__name__)

#: Image formats the server can accept, by media type, and the PIL decoder each is read with.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
_MEDIA = {fmt: ctype for ctype, fmt in FORMATS.items()}
#: ``?censor=`` values: every action that hides an image (each returns one of the upload's size).
CENSOR = HIDING_ACTIONS
#: Room for the multipart framing around each file, on top of ``max_upload_bytes``.
_MULTIPART_OVERHEAD = 64 * 1024
#: Largest multipart text field.
_MAX_FIELD = 64 * 1024

Level = Literal[NSFW_LEVELS]  # "low", "medium", "high"
LevelQuery = Annotated[Level | None, Query(description="override the level for this request")]
ThresholdQuery = Annotated[float | None, Query(ge=0.0, le=1.0, description="override the threshold for this request")]
CensorQuery = Annotated[Literal[CENSOR] | None, Query(description="return the image, censored if flagged")]


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
        max_pixels: largest accepted image, width * height, checked before decoding.
        max_pixels_in_flight: most decoded pixels held at once, over all requests (None:
            4 * ``max_pixels``); each upload reserves its width * height before decoding.
        busy_timeout: seconds an upload waits for room in that budget before a 503.
        max_files: most images in one ``/compute/batch`` request.
        content_types: accepted formats (read from the bytes), a subset of ``FORMATS``.
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
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ValueError(f"device must be a torch device such as 'cuda' or 'cpu', got {self.device!r}") from None
        if self.dtype is not None:
            resolve_dtype(self.dtype, torch.device("cpu"))
        if self.combine is not None and self.combine not in RULES:
            raise ValueError(f"combine must be one of {RULES}, got {self.combine!r}")
        if self.band is not None:
            if len(self.band) != 2:
                raise ValueError(f"band must be two numbers LO HI, got {self.band!r}")
            lo, hi = (check_threshold(b, "band") for b in self.band)
            if lo > hi:
                raise ValueError(f"band must have LO <= HI, got {self.band!r}")
            if self.combine in BANDLESS:
                raise ValueError(f"combine={self.combine} runs both models on every image: it takes no band")
            object.__setattr__(self, "band", (lo, hi))
        if self.second_opinion is None and (self.band is not None or self.combine is not None):
            raise ValueError("band and combine need a second_opinion model")
        if self.api_key is not None and not (isinstance(self.api_key, str) and self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string")
        if self.max_pixels_in_flight is None:
            object.__setattr__(self, "max_pixels_in_flight", 4 * self.max_pixels)
        for name in ("max_batch_size", "max_upload_bytes", "max_pixels", "max_pixels_in_flight", "max_files",
                     "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_pixels_in_flight < self.max_pixels:
            raise ValueError(f"max_pixels_in_flight ({self.max_pixels_in_flight:,}) must be at least "
                             f"max_pixels ({self.max_pixels:,}), or the largest image could never be decoded")
        for name, top in (("max_wait_ms", 10_000), ("busy_timeout", 3600), ("header_timeout", 3600),
                          ("body_timeout", 3600)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= top):
                raise ValueError(f"{name} must be in [0, {top}], got {value!r}")
        types = tuple(self.content_types)
        unknown = [t for t in types if t not in FORMATS]
        if not types or unknown:
            raise ValueError(f"content_types must be a non-empty subset of {tuple(FORMATS)}, got {types!r}")
        object.__setattr__(self, "content_types", types)
        self._check_regions()

    def _check_regions(self) -> None:
        """What can be checked without loading the region model (which checks the rest)."""
        if self.region_shape not in SHAPES:
            raise ValueError(f"region_shape must be one of {SHAPES}, got {self.region_shape!r}")
        if not (isinstance(self.region_feather, (int, float)) and 0 <= self.region_feather <= 1):
            raise ValueError(f"region_feather must be in [0, 1], got {self.region_feather!r}")
        if self.regions is None or self.region_model is not None:
            return  # a model of the user's own has its own class names
        chosen = _class_indices(self.regions, NUDENET_LABELS)
        for name, bounds in (("region_threshold", (0.0, 1.0)), ("region_expand", (0.0, 10.0))):
            _per_class(getattr(self, name), name, chosen, NUDENET_LABELS, 0.0, bounds)

    def region_settings(self) -> RegionSettings | None:
        """The region settings (the region model loaded), or None when region mode is off."""
        if self.regions is None:
            return None
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


def _band(raw: str) -> tuple[float, ...]:
    """``"0.3,0.7"`` or ``"0.3 0.7"`` -> (0.3, 0.7)."""
    return tuple(float(part) for part in raw.replace(",", " ").split())


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
    "max_pixels_in_flight": "NSFW_SAFETY_MAX_PIXELS_IN_FLIGHT", "busy_timeout": "NSFW_SAFETY_BUSY_TIMEOUT",
    "max_files": "NSFW_SAFETY_MAX_FILES", "content_types": "NSFW_SAFETY_CONTENT_TYPES",
    "header_timeout": "NSFW_SAFETY_HEADER_TIMEOUT", "body_timeout": "NSFW_SAFETY_BODY_TIMEOUT",
    "max_connections": "NSFW_SAFETY_MAX_CONNECTIONS", "regions": "NSFW_SAFETY_REGIONS",
    "region_model": "NSFW_SAFETY_REGION_MODEL", "region_threshold": "NSFW_SAFETY_REGION_THRESHOLD",
    "region_expand": "NSFW_SAFETY_REGION_EXPAND", "region_shape": "NSFW_SAFETY_REGION_SHAPE",
    "region_feather": "NSFW_SAFETY_REGION_FEATHER",
}
_PARSE = {"threshold": float, "max_wait_ms": float, "max_batch_size": int, "max_upload_bytes": int,
          "max_pixels": int, "max_pixels_in_flight": int, "busy_timeout": float, "max_files": int,
          "content_types": _split, "lock_policy": _bool, "header_timeout": float, "body_timeout": float,
          "max_connections": int, "band": _band, "regions": parse_classes,
          "region_threshold": lambda raw: parse_per_class(raw, "region_threshold"),
          "region_expand": lambda raw: parse_per_class(raw, "region_expand"), "region_feather": float}


class ServiceError(HTTPException):
    """An error answered as JSON ``{"error": code, "detail": detail}`` with ``status``.

    An ``HTTPException``, so that one raised while FastAPI reads the body is answered as it is.
    """

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status, detail, headers)
        self.status, self.code = status, code


# --- reading uploads (worker threads) ---------------------------------------------------------

def _clean(message: str, label: str) -> str:
    """``message`` with Python object reprs replaced by the upload's name."""
    return plain(message, label)


def sniff(head: bytes, allowed: Sequence[str]) -> str | None:
    """The PIL format whose signature (magic number) ``head`` starts with, else None.

    Args:
        head: a file's first 16 bytes.
        allowed: PIL formats tried first, so that a JPEG reads as "JPEG" and not as "MPO".
    """
    Image.init()
    for fmt in [*allowed, *(f for f in Image.ID if f not in allowed)]:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        with contextlib.suppress(Exception):  # a plugin's check on a short or odd head
            if accept is not None and accept(head):
                return fmt
    return None


def peek(file: IO[bytes], size: int, label: str, settings: Settings) -> tuple[str, int]:
    """Check an upload's size and format, and read its pixel count from the header, without decoding.

    Args:
        file: the upload (seekable).
        size: its length in bytes.
        label: how errors name it.
    Returns:
        (PIL format, width * height).
    Raises:
        ServiceError: 400 empty or unreadable, 413 too many bytes or pixels, 415 a format not accepted.
    """
    if size == 0:
        raise ServiceError(400, "empty_upload", f"{label} is empty")
    if size > settings.max_upload_bytes:
        raise ServiceError(413, "upload_too_large",
                           f"{label} has more than {settings.max_upload_bytes:,} bytes, the upload limit")
    allowed = [FORMATS[t] for t in settings.content_types]
    file.seek(0)
    fmt = sniff(file.read(16), allowed)
    if fmt is None:
        raise ServiceError(400, "unreadable_image",
                           f"{label} is not a readable image: its bytes start with no image signature "
                           f"(accepted: {', '.join(allowed)})")
    if fmt not in allowed:
        raise ServiceError(415, "unsupported_format", f"{label} is a {fmt} image (read from its bytes); "
                                                      f"accepted: {', '.join(allowed)}")
    file.seek(0)
    try:
        with Image.open(file, formats=[fmt]) as im:
            width, height = im.size
    except Image.DecompressionBombError as e:
        raise ServiceError(413, "too_many_pixels", f"{label} has too many pixels to decode safely: {e}") from None
    except Exception as e:  # noqa: BLE001 -- decoders raise anything on hostile headers
        raise ServiceError(400, "unreadable_image",
                           _clean(f"{label} is not a readable {fmt} image ({type(e).__name__}: {e})", label)) from None
    if width * height > settings.max_pixels:
        raise ServiceError(413, "too_many_pixels", f"{label} is {width}x{height} = {width * height:,} pixels, "
                                                   f"over the limit of {settings.max_pixels:,}")
    return fmt, width * height


def decode(file: IO[bytes], fmt: str, label: str, settings: Settings) -> Image.Image:
    """Decode an upload that :func:`peek` passed, with the library's :func:`open_image`.

    Raises:
        ServiceError: 400 unreadable, 413 too many pixels, 415 more than one frame.
    """
    file.seek(0)
    try:  # only the decoder of the format its bytes announce
        return open_image(file, settings.max_pixels, formats=[fmt], name=label)
    except MultiFrameImage as e:
        raise ServiceError(415, "multi_frame_image", _clean(str(e), label)) from None
    except ImageTooLarge as e:
        raise ServiceError(413, "too_many_pixels", _clean(str(e), label)) from None
    except ValueError as e:
        raise ServiceError(400, "unreadable_image", _clean(str(e), label)) from None


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` as a file of format ``fmt`` (that of the upload)."""
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}.get(fmt, {})
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _read_all(file: IO[bytes]) -> bytes:
    file.seek(0)
    return file.read()


@dataclass(frozen=True)
class Upload:
    """One decoded upload.

    Attributes:
        name: the client's filename, else the form field.
        format: the PIL format its bytes announce ("PNG", "JPEG", "WEBP").
        image: as :func:`~nsfw_safety.inputs.open_image` returns it (any mode; EXIF orientation
            applied); the library decides how a viewer sees it.
    """

    name: str
    format: str
    image: Image.Image


# --- decoded pixels in flight -----------------------------------------------------------------

class PixelBudget:
    """The decoded pixels in flight, over all requests, bounded by ``limit``.

    An upload reserves its width * height (read from its header) before it is decoded and
    gives it back once it is answered, so the images decoded, converted, scored and censored
    at any moment add up to at most ``limit`` pixels. Reservations are granted in arrival order:
    a large image is not starved by a stream of small ones.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @contextlib.asynccontextmanager
    async def reserve(self, pixels: int, timeout: float, label: str):
        """Hold ``pixels`` (at most ``limit``) for the ``async with`` block.

        Raises:
            ServiceError: 503 with ``Retry-After`` when there was no room within ``timeout`` seconds.
        """
        await self._acquire(pixels, timeout, label)
        try:
            yield
        finally:
            self._release(pixels)

    async def _acquire(self, pixels: int, timeout: float, label: str) -> None:
        if not self._waiting and self.used + pixels <= self.limit:
            self.used += pixels
            return
        entry = (pixels, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(entry[1], timeout)
        except BaseException as e:
            if entry[1].done() and not entry[1].cancelled():  # granted as we gave up: give it back
                self._release(pixels)
            else:
                entry[1].cancel()
                with contextlib.suppress(ValueError):  # _grant may have dropped it already
                    self._waiting.remove(entry)
                self._grant()  # the next in line may fit now
            if isinstance(e, asyncio.TimeoutError):
                retry = max(1, math.ceil(timeout))
                raise ServiceError(503, "server_busy",
                                   f"{label}: no room to decode its {pixels:,} pixels within {timeout:g} s "
                                   f"({self.used:,} of {self.limit:,} pixels in flight); retry after {retry} s",
                                   {"Retry-After": str(retry)}) from None
            raise

    def _release(self, pixels: int) -> None:
        self.used -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.used + self._waiting[0][0] <= self.limit:
            pixels, future = self._waiting.popleft()
            if not future.done():
                self.used += pixels
                future.set_result(None)


# --- dynamic batching -----------------------------------------------------------------------

@dataclass
class _Job:
    upload: Upload
    policy: Policy
    censor: str | None
    future: asyncio.Future
    queued: float


@dataclass(frozen=True)
class Outcome:
    """One image's answer: the decision, its reason, its scores (a ``Scores.to_dicts`` row), the
    censoring applied ("none" when passed or not asked for), the censored image (else None) and,
    in region mode, the regions censored (else None)."""

    flagged: bool
    reason: str
    scores: dict[str, Any]
    action: str
    image: Image.Image | None
    regions: list[dict[str, Any]] | None = None


class Batcher:
    """Queue images from concurrent requests and score them together in one worker thread.

    The first queued image opens a batch; the batch closes when it holds ``max_batch_size``
    images or ``max_wait_ms`` after that image was queued. While a batch is on the device new
    images queue up, so under load batches fill without waiting. The event loop never runs
    the model. A batch that fails is scored again one image at a time, so one image that
    cannot be scored fails alone.

    Attributes:
        sizes: how many batches of each size were scored.
    """

    def __init__(self, detector: Detector, max_batch_size: int, max_wait_ms: float,
                 regions: RegionSettings | None = None):
        self.detector = detector
        self.regions = regions
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.sizes: collections.Counter[int] = collections.Counter()
        self._pending: collections.deque[_Job] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nsfw-safety-score")
        self._task = asyncio.get_running_loop().create_task(self._run())
        # one SafetyFilter per (level, threshold, action) seen; requests rarely vary these
        self._filter = functools.lru_cache(maxsize=32)(self._make_filter)

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, uploads: list[Upload], policy: Policy, censor: str | None) -> list[Outcome]:
        """Queue ``uploads`` and wait for their outcomes.

        Raises:
            ServiceError: 503 when scoring failed.
        """
        loop = asyncio.get_running_loop()
        jobs = [_Job(u, policy, censor, loop.create_future(), loop.time()) for u in uploads]
        self._pending.extend(jobs)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(job.future for job in jobs)))
        finally:
            for job in jobs:  # a client that went away: its images are skipped, not scored
                job.future.cancel()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for job in self._pending:
            job.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        while True:  # no batch is kept in a local here: its images go once answered
            await self._fill()
            await self._answer(self._take())

    async def _fill(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0].queued + self.max_wait
        while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self) -> list[_Job]:
        batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
        return [job for job in batch if not job.future.done()]

    async def _answer(self, batch: list[_Job]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()
        try:
            outcomes = await loop.run_in_executor(self._executor, self._score, batch)
        except Exception as e:  # noqa: BLE001 -- fail closed: the waiting requests get a 503
            log.exception("scoring a batch of %d images failed", len(batch))
            if len(batch) > 1:
                for job in batch:
                    await self._answer([job])
                return
            error = ServiceError(503, "scoring_failed", f"scoring failed: {type(e).__name__}: {e}")
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        self.sizes[len(batch)] += 1
        for job, outcome in zip(batch, outcomes):
            if not job.future.done():
                job.future.set_result(outcome)

    def _make_filter(self, level: str, threshold: float, action: str) -> SafetyFilter:
        return SafetyFilter(self.detector, level, threshold, action=action, regions=self.regions)

    def _score(self, batch: list[_Job]) -> list[Outcome]:
        """Runs in the worker thread: one detector call for the whole batch."""
        start = time.perf_counter()
        scores = self.detector.predict([job.upload.image for job in batch])
        scores = scores.to("cpu")  # one copy to the host; the per-request policies then run on the CPU
        rows = scores.to_dicts()
        groups: dict[tuple[Policy, str | None], list[int]] = collections.defaultdict(list)
        for i, job in enumerate(batch):
            groups[(job.policy, job.censor)].append(i)
        out: list[Outcome | None] = [None] * len(batch)
        for (policy, action), index in groups.items():
            sub = scores[index]
            found = [None] * len(index)
            if action is None and self.regions is None:  # scores only: the policy alone, no pixels to copy back
                verdict = policy.decide(sub)
                flagged, reasons = verdict.flagged, verdict.reasons
                actions, images = ["none"] * len(index), [None] * len(index)
            else:  # censoring, or the regions of the flagged images (without ?censor=: found, not applied)
                guard = self._filter(policy.level, policy.threshold, action or "none")
                result = guard([batch[i].upload.image for i in index], scores=sub)
                flagged, reasons, actions = result.flagged, result.reasons, result.actions
                if action is None:
                    actions = ["none"] * len(index)
                images = [im if a != "none" else None for im, a in zip(result.images, actions)]
                if result.regions is not None:
                    found = [[r.to_dict() for r in row] for row in result.regions]
            for i, f, r, a, im, rg in zip(index, flagged, reasons, actions, images, found):
                out[i] = Outcome(f, r, rows[i], a, im, rg)
        log.debug("scored a batch of %d in %.1f ms", len(batch), 1000 * (time.perf_counter() - start))
        return out


# --- multipart bodies, bounded while they stream ----------------------------------------------

class _BoundedMultiPart(MultiPartParser):
    """starlette's multipart parser with the upload limits applied while the body streams in.

    At most ``max_files`` file parts (one more is a 413); each file spooled only up to
    ``max_bytes + 1`` bytes and the rest dropped as it arrives, so an oversized file
    costs no temp disk and is still answered 413 by :func:`peek`; text fields of at most 64 KiB.
    (python-multipart bounds each part's headers.)
    """

    def __init__(self, headers, stream, max_files: int, max_bytes: int):
        super().__init__(headers, stream, max_files=math.inf, max_fields=16, max_part_size=_MAX_FIELD)
        self.file_limit, self.max_bytes = max_files, max_bytes
        self._files = 0
        self._kept = 0  # bytes of the current part spooled

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._kept = 0

    def on_headers_finished(self) -> None:
        super().on_headers_finished()
        if self._current_part.file is not None:
            self._files += 1
            if self._files > self.file_limit:  # the spooled file is closed (and so deleted) by parse()
                raise ServiceError(413, "too_many_files", f"more than {self.file_limit} files; the limit is {self.file_limit}")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:  # a file: keep max_bytes + 1, enough to refuse it
            end = min(end, start + max(0, self.max_bytes + 1 - self._kept))
            self._kept += end - start
            if end == start:
                return
        super().on_part_data(data, start, end)


class _UploadRequest(Request):
    """A request whose multipart form is read by :class:`_BoundedMultiPart`."""

    max_files = 1
    max_bytes = 0

    def form(self, **_: Any):  # FastAPI's generic limits give way to the upload limits
        return self._bounded_form()

    async def _bounded_form(self) -> FormData:
        if self.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return await super().form(max_files=0, max_fields=16, max_part_size=_MAX_FIELD)
        async with contextlib.aclosing(self.stream()) as stream:
            try:
                return await _BoundedMultiPart(self.headers, stream, self.max_files, self.max_bytes).parse()
            except MultiPartException as e:
                raise ServiceError(400, "invalid_multipart", e.message) from None


def _upload_route(service: "Service") -> type[APIRoute]:
    """The route class of ``/compute*``: the API key and a loaded model are checked before any of
    the body is read, and the body is read by :class:`_UploadRequest`."""

    class UploadRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()
            batch = self.path.rstrip("/").endswith("/batch")

            async def guarded(request: Request) -> Response:
                service.authorize(request)
                service.require_ready()
                bounded = _UploadRequest(request.scope, request.receive)
                bounded.max_files = service.settings.max_files if batch else 1
                bounded.max_bytes = service.settings.max_upload_bytes
                return await handler(bounded)

            return guarded

    return UploadRoute


# --- the app ----------------------------------------------------------------------------------

class ModelInfo(BaseModel):
    id: str = Field(description="the model's hub id or checkpoint directory")
    revision: str | None = Field(description="the hub revision asked for (null: the default branch)")


class Part(BaseModel):
    model: str = Field(description="the model's name, as reasons name it")
    scored: bool = Field(description="false where a cascade's second model did not run (outside its band)")
    levels: dict[str, float] | None
    probs: dict[str, float | None] | None
    problem: str | None = Field(description="why this model's scores are invalid, e.g. non-finite model output")


class RegionBox(BaseModel):
    label: str = Field(description="the region detector's class, e.g. BUTTOCKS_EXPOSED or FACE_FEMALE")
    score: float
    box: list[float] = Field(description="x1, y1, x2, y2 in the image's pixels")


class Result(BaseModel):
    category: Literal["safe", "nsfw"] = Field(description="nsfw when flagged at the level and threshold")
    flagged: bool
    reason: str = Field(description='why, e.g. "medium 0.83 >= 0.50" or "medium 0.12 < 0.50"')
    level: str = Field(description="the level the decision was taken at")
    threshold: float
    levels: dict[str, float] = Field(description="cumulative level scores: neutral, low, medium, high")
    probs: dict[str, float | None] = Field(description="the model's class probabilities")
    model: ModelInfo
    parts: list[Part] | None = Field(None, description="with --second-opinion: each model's own scores, in order "
                                                      "(first, second); absent for one model")
    filename: str
    width: int
    height: int
    regions: list[RegionBox] | None = Field(None, description="region mode only (else null): the regions of a "
                                                              "flagged image that are censored (empty when it is "
                                                              "censored whole, or passed)")


class BatchItem(Result):
    action: str | None = Field(None, description="with ?censor=: the censoring applied (none: the image passed)")
    media_type: str | None = Field(None, description="with ?censor=: the image's type, read from its bytes")
    image: str | None = Field(None, description="with ?censor=: the censored image, base64, in the upload's "
                                                "format; null when it passed (use your copy)")


class FileError(BaseModel):
    filename: str
    error: str = Field(description="a stable code, e.g. unreadable_image, unsupported_format, too_many_pixels")
    detail: str = Field(description="what was wrong with this file")
    status: int = Field(description="the HTTP status this file alone would have got")


class BatchResult(BaseModel):
    results: list[BatchItem | FileError] = Field(description="one entry per uploaded file, in upload order")


class ErrorBody(BaseModel):
    error: str = Field(description="a stable code, e.g. unreadable_image, too_many_pixels, scoring_failed")
    detail: str = Field(description="what was wrong, naming the upload or parameter")


_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 403, 408, 413, 415, 422, 503)}


@dataclass(frozen=True)
class Answer:
    """One file's answer: its JSON result, the censoring applied ("none" when it passed or was
    not asked for), its media type (from its bytes) and, when censored, the censored file."""

    result: dict[str, Any]
    action: str
    media_type: str
    image: bytes | None


class Service:
    """The app's state: settings, the detector (once loaded), the batcher and the pixel budget."""

    def __init__(self, settings: Settings, detector: Detector | None, regions: RegionSettings | None = None):
        self.settings = settings
        self.detector = detector
        #: region mode's settings once loaded (None when off)
        self.regions = regions
        self.error: str | None = None
        self.batcher: Batcher | None = None
        self.budget = PixelBudget(settings.max_pixels_in_flight)
        self._loading: asyncio.Task | None = None

    async def start(self) -> None:
        if self.detector is not None and (self.regions is not None or self.settings.regions is None):
            self._ready(self.detector)
        else:
            self._loading = asyncio.get_running_loop().create_task(self._load())

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        if self.batcher is not None:
            await self.batcher.close()

    async def _load(self) -> None:
        s = self.settings

        def load() -> Any:
            detector = load_detector(s.model, revision=s.revision, device=s.device, dtype=s.dtype,
                                     max_batch_size=s.max_batch_size)
            if s.second_opinion is None:
                return detector
            return second_opinion(detector, s.second_opinion, band=s.band, level=s.level, threshold=s.threshold,
                                  combine=s.combine or "override", dtype=s.dtype, max_batch_size=s.max_batch_size)

        loop = asyncio.get_running_loop()
        try:
            detector = self.detector or await loop.run_in_executor(None, load)
            if self.regions is None and s.regions is not None:
                self.regions = await loop.run_in_executor(None, s.region_settings)
        except Exception as e:  # noqa: BLE001 -- reported by /ready and /health, and every request 503s
            log.exception("could not load model %r", s.model if self.detector is None else s.region_model)
            self.error = f"{type(e).__name__}: {e}"
            return
        self._ready(detector)

    def _ready(self, detector: Detector) -> None:
        self.detector = detector
        self.batcher = Batcher(detector, self.settings.max_batch_size, self.settings.max_wait_ms, self.regions)
        log.info("ready: %r, batches of up to %d, max wait %g ms", detector,
                 self.settings.max_batch_size, self.settings.max_wait_ms)

    def authorize(self, request: Request) -> None:
        """Raises ServiceError 401 unless the request carries the API key (when one is set)."""
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(given.encode(), key.encode()):  # constant time
            raise ServiceError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                                    "or 'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})

    def require_ready(self) -> Batcher:
        if self.batcher is not None:
            return self.batcher
        if self.error is not None:
            raise ServiceError(503, "model_unavailable", f"the model could not be loaded: {self.error}")
        raise ServiceError(503, "not_ready", "the model is still loading", {"Retry-After": "5"})

    def policy(self, level: str | None, threshold: float | None) -> Policy:
        """The request's policy; with ``lock_policy``, never looser than the configured one.

        Levels are cumulative (``low >= medium >= high`` for every image), so a lower level at a
        lower or equal threshold flags every image the configured policy flags, and more.
        """
        s = self.settings
        level = level or s.level
        threshold = s.threshold if threshold is None else threshold
        if s.lock_policy and (level_index(level) > level_index(s.level) or threshold > s.threshold):
            raise ServiceError(403, "policy_locked",
                               f"level={level}, threshold={threshold:g} is looser than this service's policy "
                               f"({s.level} at {s.threshold:g}); it only accepts a lower or equal level and threshold")
        try:
            return Policy(level, threshold)
        except (TypeError, ValueError) as e:
            raise ServiceError(422, "invalid_query", str(e)) from None

    async def answer(self, file: UploadFile, label: str, policy: Policy, censor: str | None) -> Answer:
        """Check, decode, score and (on request) censor one upload, holding its pixels meanwhile.

        Raises:
            ServiceError: the upload's own 4xx, or 503 when busy or when scoring failed.
        """
        s = self.settings
        fmt, pixels = await run_in_threadpool(peek, file.file, file.size, label, s)
        async with self.budget.reserve(pixels, s.busy_timeout, label):
            image = await run_in_threadpool(decode, file.file, fmt, label, s)
            upload = Upload(file.filename or label, fmt, image)
            [outcome] = await self.require_ready().submit([upload], policy, censor)
            data = None if outcome.image is None else await run_in_threadpool(encode, outcome.image, fmt)
            return Answer(self.result(upload, outcome, policy), outcome.action, _MEDIA[fmt], data)

    def result(self, upload: Upload, outcome: Outcome, policy: Policy) -> dict[str, Any]:
        parts = {"parts": outcome.scores["parts"]} if "parts" in outcome.scores else {}  # a second opinion
        return {"category": "nsfw" if outcome.flagged else "safe", "flagged": outcome.flagged,
                "reason": outcome.reason, "level": policy.level, "threshold": policy.threshold,
                "levels": outcome.scores["levels"], "probs": outcome.scores["probs"],
                "model": {"id": self.detector.model_id, "revision": self.detector.revision}, **parts,
                "filename": upload.name, "width": upload.image.width, "height": upload.image.height,
                "regions": outcome.regions}


def _label(file: UploadFile, field_name: str) -> str:
    """How errors name an upload: its filename, else its form field."""
    return repr(file.filename) if file.filename else field_name


class _BodyGuard:
    """ASGI middleware on every request body: over ``limit_for(path)`` bytes is a 413, refused
    before it is parsed or spooled to disk (by Content-Length, and by counting for streamed
    bodies); a body not all there ``timeout`` seconds after the headers is a 408."""

    def __init__(self, app, limit_for, timeout: float):
        self.app = app
        self.limit_for = limit_for
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        too_large = HTTPException(413, f"the request body is over the limit of {limit:,} bytes", {"Connection": "close"})
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            body = {"error": "request_too_large", "detail": too_large.detail}
            return await JSONResponse(body, 413, {"Connection": "close"})(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        received, complete = 0, False

        async def guarded():
            nonlocal received, complete
            if complete:  # after the body, e.g. waiting for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:  # FastAPI re-raises HTTPExceptions from body parsing
                raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s",
                                    {"Connection": "close"}) from None
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)


def create_app(settings: Settings | None = None, *, detector: Detector | None = None,
               regions: RegionSettings | None = None) -> FastAPI:
    """The FastAPI app.

    Args:
        settings: default :class:`Settings`.
        detector: an already loaded detector to serve (``settings.model`` and friends are then
            ignored); by default the model is loaded in a thread when the app starts, and
            ``/ready`` turns true once it is.
        regions: region mode's settings, already loaded (``settings.regions`` and the other
            ``region_*`` settings are then ignored); by default they are built from ``settings``
            when the app starts, with the model.
    """
    settings = settings or Settings()
    service = Service(settings, detector, regions)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from the package, not a CDN
    app = FastAPIOffline(
        title="nsfw-safety", lifespan=lifespan,
        description="NSFW detection for generated images: scores per level, a safe/nsfw category at a "
                    "level and threshold, and the censored image on request.")
    app.state.service = service
    single = settings.max_upload_bytes + _MULTIPART_OVERHEAD
    app.add_middleware(_BodyGuard, timeout=settings.body_timeout, limit_for=lambda path: single * settings.max_files
                       if path.rstrip("/").endswith("/batch") else single)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError):
        if e.status >= 500:
            log.warning("%s %s: %d %s: %s", request.method, request.url.path, e.status, e.code, e.detail)
        return JSONResponse({"error": e.code, "detail": e.detail}, e.status, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        return JSONResponse({"error": "invalid_request", "detail": _describe(e.errors())}, 422)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = "request_too_large" if e.status_code == 413 else \
            HTTPStatus(e.status_code).phrase.lower().replace(" ", "_").replace("-", "_")
        return JSONResponse({"error": code, "detail": str(e.detail)}, e.status_code, getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug: uvicorn logs the traceback
        return JSONResponse({"error": "internal_error", "detail": "internal error; see the server log"}, 500)

    # the key is checked by the route class before the body is read; these declare it in the schema
    schemes = [Security(HTTPBearer(auto_error=False)), Security(APIKeyHeader(name="X-API-Key", auto_error=False))]
    router = APIRouter(route_class=_upload_route(service), dependencies=schemes if settings.api_key else [])

    @router.post("/compute", response_model=Result, responses={
        **_ERRORS, 200: {"content": {m: {} for m in FORMATS},
                         "description": "JSON scores, or with ?censor= the image (X-NSFW-* headers hold the scores)"}})
    async def compute(file: UploadFile = File(..., description="the image (PNG, JPEG or WebP)"),
                      level: LevelQuery = None, threshold: ThresholdQuery = None, censor: CensorQuery = None):
        """Score one image; with ``?censor=`` return the image instead, censored when flagged."""
        policy = service.policy(level, threshold)
        answer = await service.answer(file, _label(file, "file"), policy, censor)
        if censor is None:
            return answer.result
        data = answer.image if answer.image is not None else await run_in_threadpool(_read_all, file.file)
        return Response(data, media_type=answer.media_type, headers=_headers(answer.result, answer.action))

    @router.post("/compute/batch", response_model=BatchResult, responses=_ERRORS)
    async def compute_batch(files: list[UploadFile] = File(..., description="the images, in order"),
                            level: LevelQuery = None, threshold: ThresholdQuery = None, censor: CensorQuery = None):
        """Score several images; one entry per file, in upload order: its result, or its error.
        With ``?censor=``, each result also carries the censored image (base64)."""
        policy = service.policy(level, threshold)
        labels = [_label(f, f"files[{i}]") for i, f in enumerate(files)]
        answers = await asyncio.gather(*(service.answer(f, label, policy, censor) for f, label in zip(files, labels)),
                                       return_exceptions=True)
        results = []
        for file, label, answer in zip(files, labels, answers):
            if isinstance(answer, ServiceError):
                results.append({"filename": file.filename or label, "error": answer.code,
                                "detail": answer.detail, "status": answer.status})
            elif isinstance(answer, BaseException):
                raise answer
            elif censor is None:
                results.append(answer.result)
            else:
                image = None if answer.image is None else base64.b64encode(answer.image).decode("ascii")
                results.append({**answer.result, "action": answer.action, "media_type": answer.media_type,
                                "image": image})
        return JSONResponse({"results": results})

    app.include_router(router)

    @app.get("/health", responses={503: {"description": "the model failed to load (status: error)"}})
    async def health():
        """Liveness, the model, the settings, and the batch sizes scored so far. ``status`` is
        ``ok``, ``loading``, or ``error`` (with the reason in ``error``; HTTP 503)."""
        det, batcher = service.detector, service.batcher
        status = "ok" if batcher is not None else "error" if service.error is not None else "loading"
        sizes = batcher.sizes if batcher else collections.Counter()
        return JSONResponse({
            "status": status, "ready": batcher is not None, "error": service.error,
            "model": {"id": det.model_id, "revision": det.revision} if det else None,
            "device": str(det.device) if det else None, "dtype": str(det.dtype).removeprefix("torch.") if det else None,
            "settings": {"level": settings.level, "threshold": settings.threshold,
                         "lock_policy": settings.lock_policy, "api_key": settings.api_key is not None,
                         "max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
            "regions": service.regions.to_dict() if service.regions is not None else None,
            "queued": batcher.queued if batcher else 0,
            "pixels_in_flight": {"used": service.budget.used, "limit": service.budget.limit},
            "batches": {"count": sum(sizes.values()), "images": sum(k * v for k, v in sizes.items()),
                        "largest": max(sizes, default=0), "sizes": {str(k): sizes[k] for k in sorted(sizes)}},
        }, 503 if status == "error" else 200)

    @app.get("/ready", responses={503: {"description": "the model is loading, or failed to load"}})
    async def ready():
        """200 ``{"ready": true}`` once the model is loaded; 503 until then."""
        ok = service.batcher is not None
        return JSONResponse({"ready": ok, "error": service.error}, 200 if ok else 503)

    return app


def _describe(errors: list[dict[str, Any]]) -> str:
    """Validation errors as one sentence that names each field."""
    parts = []
    for e in errors:
        where, *name = [str(x) for x in e.get("loc", ())] or ["request"]
        name = ".".join(name)
        if where == "body" and e.get("type") == "missing":
            parts.append(f"missing multipart field {name!r} (e.g. curl -F {name}=@image.png)")
        elif where == "body":
            parts.append(f"multipart field {name!r}: {e['msg']}")
        else:
            parts.append(f"{where} parameter {name!r}: {e['msg']}")
    return "; ".join(parts)


def _headers(result: dict[str, Any], action: str) -> dict[str, str]:
    """The scores of a censored-image response, as ASCII headers."""
    return {
        "X-NSFW-Category": result["category"], "X-NSFW-Flagged": str(result["flagged"]).lower(),
        "X-NSFW-Reason": result["reason"], "X-NSFW-Action": action,
        "X-NSFW-Level": result["level"], "X-NSFW-Threshold": str(result["threshold"]),
        "X-NSFW-Levels": json.dumps(result["levels"]), "X-NSFW-Probs": json.dumps(result["probs"]),
        "X-NSFW-Model": json.dumps(result["model"]["id"])[1:-1],
        "X-NSFW-Revision": result["model"]["revision"] or "",
        **({"X-NSFW-Regions": str(len(result["regions"]))} if result.get("regions") is not None else {}),
    }


# --- uvicorn ------------------------------------------------------------------------------------

def _header_deadline(base: type, timeout: float) -> type:
    """The uvicorn HTTP protocol ``base``, closing connections whose request headers are not all
    there ``timeout`` seconds after the connection opened or its last response was sent.

    uvicorn has no such timeout: its keep-alive timer stops at the first byte, so a client that
    sends a header line now and then holds a connection for ever. The body has its own deadline
    in the app (:class:`_BodyGuard`).
    """

    class HeaderDeadline(base):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout, self._expire)

        def _expire(self) -> None:
            if self.cycle is None or self.cycle.response_complete:  # no request under way: headers late
                self.transport.close()

    return HeaderDeadline


def uvicorn_config(app, settings: Settings, *, http: str = "auto", **kwargs: Any):
    """A ``uvicorn.Config`` for ``app`` that keeps the connection side of the boundary.

    Args:
        app: from :func:`create_app`.
        settings: its ``header_timeout`` and ``max_connections`` (uvicorn's ``limit_concurrency``).
        http: uvicorn's HTTP implementation: "auto", "httptools" or "h11".
        kwargs: any other ``uvicorn.Config`` argument (host, port, log_level, ...).
    """
    import uvicorn
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string

    base = import_from_string(HTTP_PROTOCOLS[http])
    return uvicorn.Config(app, http=_header_deadline(base, settings.header_timeout),
                          limit_concurrency=settings.max_connections, **kwargs)


# --- command line (wired by `nsfw-safety serve`) ---------------------------------------------

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
    flag("--second-opinion", "second_opinion", "a second model (as --model) that re-checks the images whose "
                                               "--model score at --level is in --band", metavar="MODEL")
    flag("--band", "band", "the first scores sent to the second model, bounds included (env: 'LO,HI'); "
                           "default: --threshold to 1, every image the first flags",
         nargs=2, type=float, metavar=("LO", "HI"))
    flag("--combine", "combine", "where the second model scored: override (default), mean or max; "
                                 "any or all: both models on every image", choices=RULES)
    flag("--level", "level", "default level", choices=NSFW_LEVELS)
    flag("--threshold", "threshold", "default threshold in [0, 1]", type=float)
    flag("--lock-policy", "lock_policy", "requests may only make the policy stricter (lower level or threshold); "
                                         "looser ones get 403", action="store_true")
    flag("--api-key", "api_key", "require this key on /compute* (Authorization: Bearer KEY or X-API-Key: KEY); "
                                 "prefer the variable, flags show in ps", metavar="KEY")
    flag("--max-batch", "max_batch_size", "most images scored together", type=int)
    flag("--max-wait-ms", "max_wait_ms", "how long an image waits for others to join its batch", type=float)
    flag("--max-upload-bytes", "max_upload_bytes", "largest accepted file", type=int)
    flag("--max-pixels", "max_pixels", "largest accepted image (width * height)", type=int)
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
    flag("--regions", "regions", "region mode: censor only these region classes of a flagged image (exposed, faces, "
                                 "all, or CLASS,CLASS,...); needs nsfw-safety[regions] (NudeNet: AGPL-3.0)",
         shown="off", type=parse_classes, metavar="CLASSES")
    flag("--region-model", "region_model", "the region detector's .onnx file (default: the nudenet package's)")
    flag("--region-threshold", "region_threshold", "a region's minimum score: one number, or CLASS=NUMBER,...",
         type=lambda raw: parse_per_class(raw, "region_threshold"))
    flag("--region-expand", "region_expand", "grow each box by this fraction: one number, or CLASS=NUMBER,...",
         type=lambda raw: parse_per_class(raw, "region_expand"))
    flag("--region-shape", "region_shape", "the mask's shape", choices=SHAPES)
    flag("--region-feather", "region_feather", "the mask's soft edge, a fraction of the box's longer side", type=float)
    parser.add_argument("--host", default=None, help="address to listen on [env NSFW_SAFETY_HOST; default 127.0.0.1]")
    parser.add_argument("--port", default=None, type=int, help="port [env NSFW_SAFETY_PORT; default 8000]")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="log level [default info]")


def run(args: argparse.Namespace) -> int:
    """Serve with uvicorn until interrupted; returns the exit code (2 for bad settings)."""
    import uvicorn

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # unless the CLI did
    try:
        settings = Settings.from_env(**{f.name: getattr(args, f.name, None) for f in fields(Settings)})
        host = args.host or os.environ.get("NSFW_SAFETY_HOST", "").strip() or "127.0.0.1"
        port = args.port
        if port is None:
            raw = os.environ.get("NSFW_SAFETY_PORT", "").strip() or "8000"
            if not raw.isdigit():
                raise ValueError(f"NSFW_SAFETY_PORT={raw!r}: expected a port number")
            port = int(raw)
    except (TypeError, ValueError) as e:
        log.error("bad server settings: %s", e)
        return 2
    logging.getLogger("nsfw_safety").setLevel(args.log_level.upper())
    config = uvicorn_config(create_app(settings), settings, host=host, port=port, log_level=args.log_level)
    uvicorn.Server(config).run()
    return 0
