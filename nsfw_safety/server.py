"""HTTP service: an image, animation or video in, scores out, a censored copy on request, batched under load.

    pip install -e ".[server]"          # from a clone; see the README's Install section
    nsfw-safety serve --model eva --host 127.0.0.1 --port 8000

Routes: ``POST /compute`` (one file), ``POST /compute/batch`` (several), ``GET /health``,
``GET /ready``, ``GET /docs`` (Swagger UI served from the package, no CDN). Every request runs
the library's one path: uploads are decoded in worker threads, queued, scored together by
:class:`Batcher` (one ``Detector.predict`` per batch), judged by each request's own
:class:`~nsfw_safety.levels.Policy`, and censored by a :class:`~nsfw_safety.filter.SafetyFilter`
fed those same scores. Animations (GIF, WebP, APNG) and videos (MP4, MOV, WebM) are checked
every frame by :func:`~nsfw_safety.video.check_video`, whose chunks of frames are queued on the
same batcher, each scored in its turn between batches of still images.

The boundary, in the order a request meets it:

* connection: request headers must arrive within ``header_timeout`` (:func:`uvicorn_config`);
* ``/compute*``: the API key, if one is set, and a loaded model, before any of the body is read;
* body: at most ``max_files * (max_upload_bytes + 64 KiB)`` bytes, all there within
  ``body_timeout`` (:class:`_BodyGuard`); multipart parts are bounded while they stream in, so an
  oversized file costs no temp disk (:class:`_BoundedMultiPart`);
* each file: its format read from its bytes, never from the declared type; its pixel count read
  from its header, and reserved from a budget shared by all requests (:class:`PixelBudget`)
  before it is decoded;
* an animation or video: copied to a temporary file for its decoders; its frame size, frame
  count and playing time read from its header and checked against the limits before any frame
  is decoded, and again while decoding (a header can lie: a file found over a limit then is
  refused, never answered on the frames before it); the frames of one chunk, plus the
  decoder's own, reserved from the same budget.

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
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Annotated, Any, Literal, Sequence

import anyio
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

from .cascade import second_opinion
from .detector import Detector, load_detector
from .filter import SafetyFilter
from .frames import VideoError, VideoInfo, VideoLimits, VideoTooLarge, probe, write_censored
from .inputs import ImageTooLarge, frame_count, open_image, plain
from .censor import HIDING_ACTIONS
from .levels import LEVELS, NSFW_LEVELS, Policy, Scores, level_index
from .regions.settings import RegionSettings
from .serve_settings import ENV, FORMATS, VIDEO_FORMATS, Settings, add_arguments, from_args  # noqa: F401
from .video import VideoResult, check_video, frame_ranges

log = logging.getLogger(__name__)

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


#: The video containers :func:`sniff` recognises (MKV is recognised, to be named, not accepted).
_VIDEOS = ("MP4", "MOV", "WEBM", "MKV")
#: ISO base media (``ftyp``) brands of still images: AVIF and HEIF share the MP4 container.
_IMAGE_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"}


def _video_format(head: bytes) -> str | None:
    """The video container whose signature ``head`` starts with: "MP4", "MOV", "WEBM", "MKV", else None."""
    if head[4:8] == b"ftyp":  # ISO base media: the major brand tells QuickTime from MP4 (and stills)
        brand = head[8:12]
        return None if brand in _IMAGE_BRANDS else "MOV" if brand == b"qt  " else "MP4"
    if head[4:8] in (b"moov", b"mdat", b"wide", b"free", b"skip"):  # an old QuickTime file: no ftyp
        return "MOV"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska, or WebM if its DocType says so
        return "WEBM" if b"webm" in head else "MKV"
    return None


def sniff(head: bytes, allowed: Sequence[str]) -> str | None:
    """The format whose signature (magic number) ``head`` starts with, else None: a PIL format,
    or a video container of :func:`_video_format`.

    Args:
        head: a file's first 64 bytes.
        allowed: formats tried first, so that a JPEG reads as "JPEG" and not as "MPO".
    """
    Image.init()
    for fmt in [*allowed, *(f for f in _VIDEOS if f not in allowed), *(f for f in Image.ID if f not in allowed)]:
        if fmt in _VIDEOS:
            if _video_format(head) == fmt:
                return fmt
            continue
        accept = Image.OPEN.get(fmt, (None, None))[1]
        with contextlib.suppress(Exception):  # a plugin's check on a short or odd head
            if accept is not None and accept(head):
                return fmt
    return None


def peek(file: IO[bytes], size: int, label: str, settings: Settings) -> tuple[str, int, bool]:
    """Check an upload's size and format, and read its pixel count from the header, without decoding.

    Args:
        file: the upload (seekable).
        size: its length in bytes.
        label: how errors name it.
    Returns:
        (format, width * height, moving): moving for an animation (more than one frame) or a
        video, whose header :func:`stage` reads (pixels 0 for a video: not read here).
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
    fmt = sniff(file.read(64), allowed)
    if fmt is None:
        raise ServiceError(400, "unreadable_image",
                           f"{label} is not a readable image: its bytes start with no image or video signature "
                           f"(accepted: {', '.join(allowed)})")
    if fmt not in allowed:
        kind = "video" if fmt in _VIDEOS else "image"
        raise ServiceError(415, "unsupported_format", f"{label} is a {fmt} {kind} (read from its bytes); "
                                                      f"accepted: {', '.join(allowed)}")
    if fmt in VIDEO_FORMATS:
        return fmt, 0, True
    file.seek(0)
    try:
        with Image.open(file, formats=[fmt]) as im:
            width, height = im.size
            frames = frame_count(im)
    except Image.DecompressionBombError as e:
        raise ServiceError(413, "too_many_pixels", f"{label} has too many pixels to decode safely: {e}") from None
    except Exception as e:  # noqa: BLE001 -- decoders raise anything on hostile headers
        raise ServiceError(400, "unreadable_image",
                           _clean(f"{label} is not a readable {fmt} image ({type(e).__name__}: {e})", label)) from None
    if width * height > settings.max_pixels:
        raise ServiceError(413, "too_many_pixels", f"{label} is {width}x{height} = {width * height:,} pixels, "
                                                   f"over the limit of {settings.max_pixels:,}")
    return fmt, width * height, frames > 1


def decode(file: IO[bytes], fmt: str, label: str, settings: Settings) -> Image.Image:
    """Decode a still image that :func:`peek` passed, with the library's :func:`open_image`.

    Raises:
        ServiceError: 400 unreadable, 413 too many pixels.
    """
    file.seek(0)
    try:  # only the decoder of the format its bytes announce
        return open_image(file, settings.max_pixels, formats=[fmt], name=label)
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


@dataclass
class _FramesJob:
    """A chunk of an animation's or video's frames, prepared: scored alone, in its turn."""

    pixels: Any  # (F, C, H, W) uint8 or float, or a list of (C, H, W), on the detector's device
    finite: Any  # (F,) bool, or None
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

    Animations and videos queue their frames a chunk at a time (:meth:`score_frames`): the
    queue is served in arrival order, and a video queues its next chunk only once the last one
    is scored, so still images queued meanwhile go first. A long video holds the scoring thread
    (and the detector's lock) for one chunk at a time and never starves the still images.

    Attributes:
        sizes: how many batches of each size were scored (still images).
        frame_chunks: how many chunks of each size were scored (frames of animations and videos).
    """

    def __init__(self, detector: Detector, max_batch_size: int, max_wait_ms: float,
                 regions: RegionSettings | None = None):
        self.detector = detector
        self.regions = regions
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.sizes: collections.Counter[int] = collections.Counter()
        self.frame_chunks: collections.Counter[int] = collections.Counter()
        self._pending: collections.deque[_Job | _FramesJob] = collections.deque()
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

    async def score_frames(self, pixels: Any, finite: Any) -> Scores:
        """Queue one chunk of prepared frames and wait for its scores, on the detector's device.

        Raises:
            ServiceError: 503 when scoring failed.
        """
        loop = asyncio.get_running_loop()
        job = _FramesJob(pixels, finite, loop.create_future(), loop.time())
        self._pending.append(job)
        self._arrived.set()
        try:
            return await job.future
        finally:
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
        if isinstance(self._pending[0], _FramesJob):  # a chunk is a batch already
            return
        deadline = self._pending[0].queued + self.max_wait
        while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self) -> list[_Job] | list[_FramesJob]:
        """The next batch: the chunk at the head of the queue, or the still images up to the next chunk."""
        if isinstance(self._pending[0], _FramesJob):
            batch = [self._pending.popleft()]
        else:
            batch = []
            while self._pending and len(batch) < self.max_batch_size and isinstance(self._pending[0], _Job):
                batch.append(self._pending.popleft())
        return [job for job in batch if not job.future.done()]

    async def _answer(self, batch: list[_Job] | list[_FramesJob]) -> None:
        if not batch:
            return
        if isinstance(batch[0], _FramesJob):
            return await self._answer_frames(batch[0])
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

    async def _answer_frames(self, job: _FramesJob) -> None:
        loop = asyncio.get_running_loop()
        try:
            scores = await loop.run_in_executor(self._executor, self.detector.score, job.pixels, job.finite)
        except Exception as e:  # noqa: BLE001 -- fail closed: the video's request gets a 503
            log.exception("scoring a chunk of %d frames failed", len(job.pixels))
            if not job.future.done():
                job.future.set_exception(ServiceError(503, "scoring_failed",
                                                      f"scoring failed: {type(e).__name__}: {e}"))
            return
        self.frame_chunks[len(job.pixels)] += 1
        if not job.future.done():
            job.future.set_result(scores)

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


# --- animations and videos (worker threads) --------------------------------------------------

#: The temporary file's suffix for each moving format (its decoders and writers go by it).
_SUFFIXES = {"GIF": ".gif", "PNG": ".png", "WEBP": ".webp", "MP4": ".mp4", "MOV": ".mov", "WEBM": ".webm"}
#: The error code of each :class:`~nsfw_safety.frames.VideoLimits` field (all 413).
_LIMIT_CODES = {"pixels": "too_many_pixels", "frames": "too_many_frames", "duration": "too_long"}
#: Frames a decoder holds besides those handed out: the canvas an animation is composed on, and
#: a video's reference frames (as YUV, half the size of RGB).
DECODER_FRAMES = 2
#: What writing a censored video costs, in frames of the pixel budget (whose unit is what a
#: still image costs, about 33 bytes a pixel): :func:`~nsfw_safety.frames.write_censored`
#: censors 32 decoded frames at a time, and the encoder looks ahead. Measured: a 64-frame
#: 1920x1080 H.264 copy, every frame blurred, peaked 1.46 GB over the idle server, 705 bytes per
#: frame pixel, 21 such frames. (An animation is reserved as all its frames plus 2: Pillow's
#: writers hold every frame.)
VIDEO_COPY_FRAMES = 24
#: Most animations and videos checked at once. Each holds a worker thread of its own while its
#: chunks wait their turn on the batcher, so they are kept out of the pool still images are
#: decoded in; more wait (up to ``busy_timeout``) for one to finish.
MOVING_AT_ONCE = 8


def video_limits(settings: Settings) -> VideoLimits:
    """What an animation or video upload may hold."""
    return VideoLimits(max_pixels=settings.max_pixels, max_frames=settings.max_frames,
                       max_duration=settings.max_duration)


def _named(message: str, path: Path, label: str) -> str:
    """``message`` naming the upload instead of its temporary file."""
    return _clean(message.replace(repr(str(path)), label).replace(str(path), label), label)


def _unreadable(fmt: str) -> str:
    return "unreadable_video" if fmt in VIDEO_FORMATS else "unreadable_image"


def _too_large(e: VideoTooLarge, path: Path, label: str) -> ServiceError:
    return ServiceError(413, _LIMIT_CODES.get(e.limit, "too_many_pixels"), _named(str(e), path, label))


def stage(file: IO[bytes], path: Path, fmt: str, label: str, settings: Settings) -> VideoInfo:
    """Copy an animation or video upload to ``path`` for its decoders, and read its header:
    frame size, frame count and playing time are checked against the limits before any frame is
    decoded (:func:`~nsfw_safety.frames.probe`).

    Raises:
        ServiceError: 413 over a limit (``too_many_pixels``, ``too_many_frames``, ``too_long``),
            400 unreadable (no video stream, no frames, not the format its bytes announce).
    """
    file.seek(0)
    with open(path, "wb") as out:
        shutil.copyfileobj(file, out, 1 << 20)
    try:
        info = probe(path, video_limits(settings))
    except VideoTooLarge as e:
        raise _too_large(e, path, label) from None
    except VideoError as e:
        raise ServiceError(400, _unreadable(fmt), _named(str(e), path, label)) from None
    if (info.kind == "video") != (fmt in VIDEO_FORMATS):
        raise ServiceError(400, _unreadable(fmt), f"{label} starts as a {fmt} file but does not read as one")
    return info


class _QueuedDetector:
    """The detector as :func:`~nsfw_safety.video.check_video` sees it for one upload: each chunk
    of at most ``max_batch_size`` frames is queued on the :class:`Batcher` and scored in its turn
    by the one scoring thread, between batches of still images."""

    def __init__(self, batcher: Batcher, loop: asyncio.AbstractEventLoop, max_batch_size: int):
        self.batcher, self.loop, self.max_batch_size = batcher, loop, max_batch_size
        self.device = batcher.detector.device

    def score(self, pixels: Any, finite: Any = None) -> Scores:
        """Runs in the upload's worker thread, and waits there for the chunk's scores."""
        return asyncio.run_coroutine_threadsafe(self.batcher.score_frames(pixels, finite), self.loop).result()


def check_moving(path: Path, fmt: str, label: str, guard: SafetyFilter, settings: Settings) -> VideoResult:
    """Check every frame of an animation or video with :func:`~nsfw_safety.video.check_video`.

    A decoding error after some frames is answered: the file is flagged, with the reason
    "checked N of M frames, then: <error>". A limit crossed while decoding is not: its header
    was within the limits (it lied, or had no say, as a GIF's playing time), and the file is
    refused as if the header had told.

    Raises:
        ServiceError: 413 a limit crossed while decoding, 400 no frame could be decoded, 503
            scoring failed.
    """
    try:
        video = check_video(path, guard, limits=video_limits(settings))
    except VideoTooLarge as e:
        raise _too_large(e, path, label) from None
    except VideoError as e:
        raise ServiceError(400, _unreadable(fmt), _named(str(e), path, label)) from None
    reason = _named(video.reason, path, label)
    if video.over_limit is not None:
        raise ServiceError(413, _LIMIT_CODES.get(video.over_limit, "too_many_pixels"),
                           f"{reason}; refused while decoding (its header was within the limits, or did not say)")
    if not video.checked:
        raise ServiceError(400, _unreadable(fmt), reason)
    return video


def censored_copy(path: Path, video: VideoResult, guard: SafetyFilter, label: str, max_bytes: int) -> bytes:
    """The censored copy of an upload checked by :func:`check_moving`, in its own format
    (:func:`~nsfw_safety.frames.write_censored`), as bytes.

    Raises:
        ServiceError: 413 when the copy is over ``max_bytes``, 500 when it could not be written.
    """
    target = path.with_name("censored" + path.suffix)
    try:
        write_censored(path, video, target, guard)
    except (ValueError, OSError) as e:
        raise ServiceError(500, "censor_failed", _named(f"{label}: the censored copy could not be written "
                                                        f"({type(e).__name__}: {e})", path, label)) from None
    size = target.stat().st_size
    if size > max_bytes:
        raise ServiceError(413, "censored_too_large",
                           f"{label}: its censored copy has {size:,} bytes, over the upload limit of {max_bytes:,} "
                           f"bytes; ask without ?censor= for the verdict")
    return target.read_bytes()


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


class FrameCount(BaseModel):
    checked: int = Field(description="frames scored (every frame, unless the check stopped early)")
    total: int = Field(description="frames in the file")
    worst: int = Field(description="the frame with the highest score at `level`: `probs` and `parts` are its own")


class Result(BaseModel):
    category: Literal["safe", "nsfw"] = Field(description="nsfw when flagged at the level and threshold")
    flagged: bool
    reason: str = Field(description='why, e.g. "medium 0.83 >= 0.50" or "medium 0.12 < 0.50"; for an animation or '
                                    'video, e.g. "checked 24 of 24 frames; flagged 2: 9-10 (1.12-1.25 s); ..." or '
                                    '"checked 5 of 24 frames, then: <error>" (flagged)')
    level: str = Field(description="the level the decision was taken at")
    threshold: float
    levels: dict[str, float] = Field(description="cumulative level scores: neutral, low, medium, high; for an "
                                                 "animation or video, the maximum over its frames")
    probs: dict[str, float | None] = Field(description="the model's class probabilities (of the worst frame)")
    model: ModelInfo
    parts: list[Part] | None = Field(None, description="with --second-opinion: each model's own scores, in order "
                                                      "(first, second); absent for one model")
    filename: str
    width: int
    height: int
    regions: list[RegionBox] | None = Field(None, description="region mode only (else null): the regions of a "
                                                              "flagged image that are censored (empty when it is "
                                                              "censored whole, or passed; animations and videos "
                                                              "are censored whole)")
    frames: FrameCount | None = Field(None, description="animations and videos only (else null)")
    flagged_frames: list[tuple[int, int]] | None = Field(
        None, description="animations and videos only: the flagged frames as inclusive ranges [first, last]")
    flagged_times: list[tuple[float, float]] | None = Field(
        None, description="animations and videos only: when each range of flagged_frames is shown, in seconds "
                          "[first frame's time, last frame's time]")


class BatchItem(Result):
    action: str | None = Field(None, description="with ?censor=: the censoring applied (none: the file passed)")
    media_type: str | None = Field(None, description="with ?censor=: the file's type, read from its bytes")
    image: str | None = Field(None, description="with ?censor=: the censored file, base64, in the upload's "
                                                "format; null when it passed (use your copy)")


class FileError(BaseModel):
    filename: str
    error: str = Field(description="a stable code, e.g. unreadable_image, unsupported_format, too_many_frames")
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
        self._moving = asyncio.Semaphore(MOVING_AT_ONCE)  # animations and videos checked at once
        self._moving_threads: anyio.CapacityLimiter | None = None  # their threads (made in start)

    async def start(self) -> None:
        self._moving_threads = anyio.CapacityLimiter(MOVING_AT_ONCE)
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
        fmt, pixels, moving = await run_in_threadpool(peek, file.file, file.size, label, s)
        if moving:
            try:
                await asyncio.wait_for(self._moving.acquire(), s.busy_timeout)
            except asyncio.TimeoutError:
                retry = max(1, math.ceil(s.busy_timeout))
                raise ServiceError(503, "server_busy",
                                   f"{label}: the service checks {MOVING_AT_ONCE} animations or videos at once, and "
                                   f"had no room within {s.busy_timeout:g} s; retry after {retry} s",
                                   {"Retry-After": str(retry)}) from None
            try:
                return await self._answer_moving(file, fmt, label, policy, censor)
            finally:
                self._moving.release()
        async with self.budget.reserve(pixels, s.busy_timeout, label):
            image = await run_in_threadpool(decode, file.file, fmt, label, s)
            upload = Upload(file.filename or label, fmt, image)
            [outcome] = await self.require_ready().submit([upload], policy, censor)
            data = None if outcome.image is None else await run_in_threadpool(encode, outcome.image, fmt)
            return Answer(self.result(upload, outcome, policy), outcome.action, _MEDIA[fmt], data)

    async def _answer_moving(self, file: UploadFile, fmt: str, label: str, policy: Policy,
                             censor: str | None) -> Answer:
        """Check every frame of an animation or video; censor it on request (see :func:`check_moving`).

        The frames of one chunk and the decoder's own are reserved from the pixel budget while
        the file is checked; a censored copy then reserves the frames its writer holds.
        """
        s = self.settings
        batcher = self.require_ready()
        with tempfile.TemporaryDirectory(prefix="nsfw-safety-") as tmp:
            path = Path(tmp) / ("upload" + _SUFFIXES[fmt])
            info = await self._in_thread(stage, file.file, path, fmt, label, s)
            frame = info.width * info.height
            chunk = min(s.max_batch_size, self.budget.limit // frame - DECODER_FRAMES)
            if chunk < 1:
                raise ServiceError(413, "too_many_pixels",
                                   f"{label} has frames of {info.width}x{info.height}: checking it holds "
                                   f"{1 + DECODER_FRAMES} frames at once, {(1 + DECODER_FRAMES) * frame:,} pixels, "
                                   f"over the {self.budget.limit:,} pixels in flight the service allows")
            queued = _QueuedDetector(batcher, asyncio.get_running_loop(), chunk)
            guard = SafetyFilter(queued, policy.level, policy.threshold, action=censor or "none", on_error="raise")
            async with self.budget.reserve(frame * (chunk + DECODER_FRAMES), s.busy_timeout, label):
                video, result = await self._in_thread(self._check_moving, path, fmt, label, file.filename or label,
                                                      guard, info, policy)
            if censor is None or not video.flagged:
                return Answer(result, "none", _MEDIA[fmt], None)
            if video.error is not None:
                raise ServiceError(422, "incomplete_check",
                                   f"{result['reason']}: no censored copy is made of a file whose check did not "
                                   f"finish (without ?censor=, the answer is this verdict: flagged)")
            frames = info.frames + DECODER_FRAMES if info.kind == "animation" else VIDEO_COPY_FRAMES
            held = frame * frames
            if held > self.budget.limit:
                raise ServiceError(413, "censor_too_large",
                                   f"{label}: writing its censored copy costs {frames} frames of "
                                   f"{info.width}x{info.height} in flight, {held:,} pixels, over the "
                                   f"{self.budget.limit:,} pixels the service allows; ask without ?censor= for "
                                   f"the verdict")
            async with self.budget.reserve(held, s.busy_timeout, label):
                data = await self._in_thread(censored_copy, path, video, guard, label, s.max_upload_bytes)
            return Answer(result, censor, _MEDIA[fmt], data)

    def result(self, upload: Upload, outcome: Outcome, policy: Policy) -> dict[str, Any]:
        parts = {"parts": outcome.scores["parts"]} if "parts" in outcome.scores else {}  # a second opinion
        return {"category": "nsfw" if outcome.flagged else "safe", "flagged": outcome.flagged,
                "reason": outcome.reason, "level": policy.level, "threshold": policy.threshold,
                "levels": outcome.scores["levels"], "probs": outcome.scores["probs"],
                "model": {"id": self.detector.model_id, "revision": self.detector.revision}, **parts,
                "filename": upload.name, "width": upload.image.width, "height": upload.image.height,
                "regions": outcome.regions, "frames": None, "flagged_frames": None, "flagged_times": None}

    async def _in_thread(self, fn, *args) -> Any:
        """``fn(*args)`` in a thread kept for animations and videos; a cancelled request waits for it."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._moving_threads)

    def _check_moving(self, path: Path, fmt: str, label: str, name: str, guard: SafetyFilter, info: VideoInfo,
                      policy: Policy) -> tuple[VideoResult, dict[str, Any]]:
        """Runs in a worker thread: the check and its result (their reads from the device too)."""
        video = check_moving(path, fmt, label, guard, self.settings)
        return video, self.moving_result(name, info, video, policy, path, label)

    def moving_result(self, name: str, info: VideoInfo, video: VideoResult, policy: Policy, path: Path,
                      label: str) -> dict[str, Any]:
        """An animation's or video's result: the fields of a still's, ``levels`` the maximum over
        its frames and ``probs`` (and ``parts``) those of its worst frame, plus the frames checked
        and the flagged frames as ranges, with their times."""
        scores = video.scores
        worst = int(scores.levels[:, LEVELS.index(policy.level)].float().argmax())
        [row] = scores[[worst]].to_dicts()
        parts = {"parts": row["parts"]} if "parts" in row else {}
        ranges = frame_ranges(video.flagged_frames)
        times = None
        if video.times is not None:
            at = dict(zip(video.flagged_frames, video.times))
            times = [[round(at[a], 4), round(at[b], 4)] for a, b in ranges]
        return {"category": "nsfw" if video.flagged else "safe", "flagged": video.flagged,
                "reason": _named(video.reason, path, label), "level": policy.level, "threshold": policy.threshold,
                "levels": video.levels, "probs": row["probs"],
                "model": {"id": self.detector.model_id, "revision": self.detector.revision}, **parts,
                "filename": name, "width": info.width, "height": info.height,
                "regions": [] if self.regions is not None else None,
                "frames": {"checked": len(video.checked), "total": video.total, "worst": video.checked[worst]},
                "flagged_frames": [list(r) for r in ranges], "flagged_times": times}


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
    videos = [t for t in settings.content_types if FORMATS[t] in VIDEO_FORMATS]
    if videos and find_spec("av") is None:
        raise ValueError(f"content_types {', '.join(videos)} need PyAV to decode videos: pip install "
                         f"'nsfw-safety[video]', or leave them out of --content-types")
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
                         "description": "JSON scores, or with ?censor= the file (X-NSFW-* headers hold the scores)"}})
    async def compute(file: UploadFile = File(..., description="the image (PNG, JPEG, WebP, GIF), animation "
                                                               "(GIF, WebP, APNG) or video (MP4, MOV, WebM)"),
                      level: LevelQuery = None, threshold: ThresholdQuery = None, censor: CensorQuery = None):
        """Score one image, animation or video (every frame); with ``?censor=`` return the file instead,
        censored when flagged (an animation or video: the flagged frames, in its own format)."""
        policy = service.policy(level, threshold)
        answer = await service.answer(file, _label(file, "file"), policy, censor)
        if censor is None:
            return answer.result
        data = answer.image if answer.image is not None else await run_in_threadpool(_read_all, file.file)
        return Response(data, media_type=answer.media_type, headers=_headers(answer.result, answer.action))

    @router.post("/compute/batch", response_model=BatchResult, responses=_ERRORS)
    async def compute_batch(files: list[UploadFile] = File(..., description="the files, in order"),
                            level: LevelQuery = None, threshold: ThresholdQuery = None, censor: CensorQuery = None):
        """Score several files (images, animations, videos); one entry per file, in upload order: its
        result, or its error. With ``?censor=``, each result also carries the censored file (base64)."""
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
        chunks = batcher.frame_chunks if batcher else collections.Counter()
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
            "frame_chunks": {"count": sum(chunks.values()), "frames": sum(k * v for k, v in chunks.items())},
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
        **({"X-NSFW-Frames": f"{result['frames']['checked']}/{result['frames']['total']}",
            "X-NSFW-Flagged-Frames": ",".join(str(a) if a == b else f"{a}-{b}" for a, b in result["flagged_frames"])}
           if result.get("frames") is not None else {}),
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


def run(args: argparse.Namespace) -> int:
    """Serve with uvicorn until interrupted; returns the exit code (2 for bad settings)."""
    import uvicorn

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # unless the CLI did
    try:
        settings, host, port = from_args(args)
        app = create_app(settings)
    except (TypeError, ValueError) as e:
        log.error("bad server settings: %s", e)
        return 2
    logging.getLogger("nsfw_safety").setLevel(args.log_level.upper())
    config = uvicorn_config(app, settings, host=host, port=port, log_level=args.log_level)
    uvicorn.Server(config).run()
    return 0
