"""HTTP service: an image in, scores out, a censored image on request, batched under load.

    pip install "nsfw-safety[server]"
    nsfw-safety serve --model eva --host 127.0.0.1 --port 8000

Routes: ``POST /compute`` (one image), ``POST /compute/batch`` (several), ``GET /health``,
``GET /ready``, ``GET /docs``. Every request runs the library's one path: uploads are decoded
in worker threads, queued, scored together by :class:`Batcher` (one ``Detector.predict`` per
batch), judged by each request's own :class:`~nsfw_safety.levels.Policy`, and censored by a
:class:`~nsfw_safety.filter.SafetyFilter` fed those same scores.

Errors are JSON ``{"error": code, "detail": message}``: 4xx for every bad request or upload,
503 while the model loads or when scoring fails (never an answer of "safe").

This module imports fastapi (the ``server`` extra); nothing else in the package imports it.
"""

import argparse
import asyncio
import collections
import contextlib
import functools
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from http import HTTPStatus
from typing import Annotated, Any, Literal, Mapping

import numpy as np
import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from .detector import Detector, load_detector, resolve_dtype
from .inputs import ImageTooLarge, open_image
from .filter import SafetyFilter
from .levels import NSFW_LEVELS, Policy, check_threshold, level_index

log = logging.getLogger(__name__)

#: Upload content types the server can accept, and the decoder each is read with.
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP"}
_MEDIA = {fmt: ctype for ctype, fmt in FORMATS.items()}
#: ``?censor=`` values: the censoring actions that return an image of the upload's size.
CENSOR = ("blur", "pixelate", "black")
#: Room for the multipart framing around each file, on top of ``max_upload_bytes``.
_MULTIPART_OVERHEAD = 64 * 1024

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
        level, threshold: the default policy; a request may override both.
        max_batch_size: most images scored together on the device.
        max_wait_ms: how long the first queued image waits for others to join its batch.
        max_upload_bytes: largest accepted file, in bytes.
        max_pixels: largest accepted image, width * height, checked before decoding.
        max_files: most images in one ``/compute/batch`` request.
        content_types: accepted upload types, a subset of ``FORMATS``.
    """

    model: str = "eva"
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    level: str = "medium"
    threshold: float = 0.5
    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_upload_bytes: int = 20 * 2**20
    max_pixels: int = 4096 * 4096  # 50 MB once decoded to RGB
    max_files: int = 16
    content_types: tuple[str, ...] = tuple(FORMATS)

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
        for name in ("max_batch_size", "max_upload_bytes", "max_pixels", "max_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"max_wait_ms must be in [0, 10000], got {self.max_wait_ms!r}")
        types = tuple(self.content_types)
        unknown = [t for t in types if t not in FORMATS]
        if not types or unknown:
            raise ValueError(f"content_types must be a non-empty subset of {tuple(FORMATS)}, got {types!r}")
        object.__setattr__(self, "content_types", types)

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


ENV = {
    "model": "NSFW_SAFETY_MODEL", "revision": "NSFW_SAFETY_REVISION", "device": "NSFW_SAFETY_DEVICE",
    "dtype": "NSFW_SAFETY_DTYPE", "level": "NSFW_SAFETY_LEVEL", "threshold": "NSFW_SAFETY_THRESHOLD",
    "max_batch_size": "NSFW_SAFETY_MAX_BATCH", "max_wait_ms": "NSFW_SAFETY_MAX_WAIT_MS",
    "max_upload_bytes": "NSFW_SAFETY_MAX_UPLOAD_BYTES", "max_pixels": "NSFW_SAFETY_MAX_PIXELS",
    "max_files": "NSFW_SAFETY_MAX_FILES", "content_types": "NSFW_SAFETY_CONTENT_TYPES",
}
_PARSE = {"threshold": float, "max_wait_ms": float, "max_batch_size": int, "max_upload_bytes": int,
          "max_pixels": int, "max_files": int, "content_types": _split}


class ServiceError(Exception):
    """An error answered as JSON ``{"error": code, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


# --- decoding (worker threads) --------------------------------------------------------------

@dataclass(frozen=True)
class Upload:
    """One decoded upload.

    Attributes:
        name: the client's filename, else the form field.
        data: the bytes as uploaded.
        format: the PIL format it was decoded as ("PNG", "JPEG", "WEBP").
        image: RGB or RGBA, EXIF orientation applied.
        pixels: (3, H, W) uint8, the RGB channels of ``image``.
    """

    name: str
    data: bytes
    format: str
    image: Image.Image
    pixels: torch.Tensor


def decode(data: bytes, content_type: str | None, name: str, settings: Settings) -> Upload:
    """Check one upload against the limits and decode it; errors name it ``name``.

    Raises:
        ServiceError: 400 empty or unreadable, 413 too many bytes or pixels, 415 wrong type.
    """
    if not data:
        raise ServiceError(400, "empty_upload", f"{name} is empty")
    if len(data) > settings.max_upload_bytes:
        raise ServiceError(413, "upload_too_large",
                           f"{name} has more than {settings.max_upload_bytes:,} bytes, the upload limit")
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype not in settings.content_types:
        raise ServiceError(415, "unsupported_content_type",
                           f"{name} has content type {ctype or 'none'!r}; accepted: {', '.join(settings.content_types)}")
    allowed = [FORMATS[t] for t in settings.content_types]
    try:  # only the allowed decoders are tried; the size is read from the header, before decoding
        image = open_image(io.BytesIO(data), settings.max_pixels, formats=allowed, name=name)
    except ImageTooLarge as e:
        raise ServiceError(413, "too_many_pixels", str(e)) from None
    except ValueError as e:
        raise ServiceError(400, "unreadable_image", f"{e} (accepted: {'/'.join(allowed)})") from None
    fmt = image.format
    if image.mode not in ("RGB", "RGBA"):
        alpha = "A" in image.getbands() or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")
    rgb = np.array(image.convert("RGB") if image.mode == "RGBA" else image)
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)
    return Upload(name, data, fmt, image, pixels)


def encode(image: Image.Image, fmt: str) -> bytes:
    """``image`` as a file of format ``fmt`` (that of the upload)."""
    buf = io.BytesIO()
    options = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}.get(fmt, {})
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


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
    censoring applied ("none" when passed or not asked for) and the censored image (else None)."""

    flagged: bool
    reason: str
    scores: dict[str, Any]
    action: str
    image: Image.Image | None


class Batcher:
    """Queue images from concurrent requests and score them together in one worker thread.

    The first queued image opens a batch; the batch closes when it holds ``max_batch_size``
    images or ``max_wait_ms`` after that image was queued. While a batch is on the device new
    images queue up, so under load batches fill without waiting. The event loop never runs
    the model.

    Attributes:
        sizes: how many batches of each size were scored.
    """

    def __init__(self, detector: Detector, max_batch_size: int, max_wait_ms: float):
        self.detector = detector
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
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._pending[0].queued + self.max_wait
            while len(self._pending) < self.max_batch_size and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
            batch = [self._pending.popleft() for _ in range(min(self.max_batch_size, len(self._pending)))]
            batch = [job for job in batch if not job.future.done()]
            if not batch:
                continue
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score, batch)
            except Exception as e:  # noqa: BLE001 -- fail closed: every waiting request gets a 503
                log.exception("scoring a batch of %d images failed", len(batch))
                error = ServiceError(503, "scoring_failed", f"scoring failed: {type(e).__name__}: {e}")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            self.sizes[len(batch)] += 1
            for job, outcome in zip(batch, outcomes):
                if not job.future.done():
                    job.future.set_result(outcome)

    def _make_filter(self, level: str, threshold: float, action: str) -> SafetyFilter:
        return SafetyFilter(self.detector, level, threshold, action=action)

    def _score(self, batch: list[_Job]) -> list[Outcome]:
        """Runs in the worker thread: one detector call for the whole batch."""
        start = time.perf_counter()
        scores = self.detector.predict([job.upload.pixels for job in batch], layout="CHW")
        # one copy to the host; the per-request policies then run on the CPU
        scores = replace(scores, probs=scores.probs.cpu(), levels=scores.levels.cpu(), status=scores.status.cpu())
        rows = scores.to_dicts()
        groups: dict[tuple[Policy, str | None], list[int]] = collections.defaultdict(list)
        for i, job in enumerate(batch):
            groups[(job.policy, job.censor)].append(i)
        out: list[Outcome | None] = [None] * len(batch)
        for (policy, action), index in groups.items():
            sub = scores[index]
            if action is None:  # scores only: the policy alone, no pixels to copy back
                flagged = policy.flag(sub.levels, sub.valid).tolist()
                reasons = policy.reasons(sub.levels, flagged, sub.problems())
                actions, images = ["none"] * len(index), [None] * len(index)
            else:
                guard = self._filter(policy.level, policy.threshold, action)
                result = guard([batch[i].upload.image for i in index], scores=sub)
                flagged, reasons, actions = result.flagged, result.reasons, result.actions
                images = [im if a != "none" else None for im, a in zip(result.images, actions)]
            for i, f, r, a, im in zip(index, flagged, reasons, actions, images):
                out[i] = Outcome(f, r, rows[i], a, im)
        log.debug("scored a batch of %d in %.1f ms", len(batch), 1000 * (time.perf_counter() - start))
        return out


# --- the app ----------------------------------------------------------------------------------

class ModelInfo(BaseModel):
    id: str = Field(description="the model's hub id or checkpoint directory")
    revision: str | None = Field(description="the hub revision asked for (null: the default branch)")


class Result(BaseModel):
    category: Literal["safe", "nsfw"] = Field(description="nsfw when flagged at the level and threshold")
    flagged: bool
    reason: str = Field(description='why, e.g. "medium 0.83 >= 0.50" or "medium 0.12 < 0.50"')
    level: str = Field(description="the level the decision was taken at")
    threshold: float
    levels: dict[str, float] = Field(description="cumulative level scores: neutral, low, medium, high")
    probs: dict[str, float | None] = Field(description="the model's class probabilities")
    model: ModelInfo
    filename: str
    width: int
    height: int


class BatchResult(BaseModel):
    results: list[Result] = Field(description="one result per uploaded file, in upload order")


class ErrorBody(BaseModel):
    error: str = Field(description="a stable code, e.g. unreadable_image, too_many_pixels, scoring_failed")
    detail: str = Field(description="what was wrong, naming the upload or parameter")


_ERRORS = {code: {"model": ErrorBody} for code in (400, 413, 415, 422, 503)}


class Service:
    """The app's state: settings, the detector (once loaded) and the batcher."""

    def __init__(self, settings: Settings, detector: Detector | None):
        self.settings = settings
        self.detector = detector
        self.error: str | None = None
        self.batcher: Batcher | None = None
        self._loading: asyncio.Task | None = None

    async def start(self) -> None:
        if self.detector is not None:
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
        load = functools.partial(load_detector, s.model, revision=s.revision, device=s.device, dtype=s.dtype,
                                 max_batch_size=s.max_batch_size)
        try:
            detector = await asyncio.get_running_loop().run_in_executor(None, load)
        except Exception as e:  # noqa: BLE001 -- reported by /ready and /health, and every request 503s
            log.exception("could not load model %r", s.model)
            self.error = f"{type(e).__name__}: {e}"
            return
        self._ready(detector)

    def _ready(self, detector: Detector) -> None:
        self.detector = detector
        self.batcher = Batcher(detector, self.settings.max_batch_size, self.settings.max_wait_ms)
        log.info("ready: %r, batches of up to %d, max wait %g ms", detector,
                 self.settings.max_batch_size, self.settings.max_wait_ms)

    def require_ready(self) -> Batcher:
        if self.batcher is not None:
            return self.batcher
        if self.error is not None:
            raise ServiceError(503, "model_unavailable", f"the model could not be loaded: {self.error}")
        raise ServiceError(503, "not_ready", "the model is still loading", {"Retry-After": "5"})

    def policy(self, level: str | None, threshold: float | None) -> Policy:
        try:
            return Policy(level or self.settings.level,
                          self.settings.threshold if threshold is None else threshold)
        except (TypeError, ValueError) as e:
            raise ServiceError(422, "invalid_query", str(e)) from None

    async def read(self, file: UploadFile, name: str) -> Upload:
        data = await file.read(self.settings.max_upload_bytes + 1)
        label = f"{name} ({file.filename!r})" if file.filename else name
        upload = await run_in_threadpool(decode, data, file.content_type, label, self.settings)
        return replace(upload, name=file.filename or name)

    def result(self, upload: Upload, outcome: Outcome, policy: Policy) -> dict[str, Any]:
        return {"category": "nsfw" if outcome.flagged else "safe", "flagged": outcome.flagged,
                "reason": outcome.reason, "level": policy.level, "threshold": policy.threshold,
                "levels": outcome.scores["levels"], "probs": outcome.scores["probs"],
                "model": {"id": self.detector.model_id, "revision": self.detector.revision},
                "filename": upload.name, "width": upload.image.width, "height": upload.image.height}


class _BodyLimit:
    """ASGI middleware: refuse request bodies over the limit with 413, before they are parsed
    or spooled to disk (by Content-Length, and by counting for streamed bodies)."""

    def __init__(self, app, limit_for):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        too_large = HTTPException(413, f"the request body is over the limit of {limit:,} bytes")
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            body = {"error": "request_too_large", "detail": too_large.detail}
            return await JSONResponse(body, 413, {"Connection": "close"})(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large  # FastAPI re-raises HTTPExceptions from body parsing
            return message

        await self.app(scope, counted, send)


def create_app(settings: Settings | None = None, *, detector: Detector | None = None) -> FastAPI:
    """The FastAPI app.

    Args:
        settings: default :class:`Settings`.
        detector: an already loaded detector to serve (``settings.model`` and friends are then
            ignored); by default the model is loaded in a thread when the app starts, and
            ``/ready`` turns true once it is.
    """
    settings = settings or Settings()
    service = Service(settings, detector)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="nsfw-safety", lifespan=lifespan,
        description="NSFW detection for generated images: scores per level, a safe/nsfw category at a "
                    "level and threshold, and the censored image on request.")
    app.state.service = service
    single = settings.max_upload_bytes + _MULTIPART_OVERHEAD
    app.add_middleware(_BodyLimit, limit_for=lambda path: single * settings.max_files
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

    @app.post("/compute", response_model=Result, responses={
        **_ERRORS, 200: {"content": {m: {} for m in FORMATS},
                         "description": "JSON scores, or with ?censor= the image (X-NSFW-* headers hold the scores)"}})
    async def compute(file: UploadFile = File(..., description="the image (PNG, JPEG or WebP)"),
                      level: LevelQuery = None, threshold: ThresholdQuery = None, censor: CensorQuery = None):
        """Score one image; with ``?censor=`` return the image instead, censored when flagged."""
        batcher = service.require_ready()
        policy = service.policy(level, threshold)
        upload = await service.read(file, "file")
        [outcome] = await batcher.submit([upload], policy, censor)
        result = service.result(upload, outcome, policy)
        if censor is None:
            return result
        data = upload.data if outcome.image is None else await run_in_threadpool(encode, outcome.image, upload.format)
        return Response(data, media_type=_MEDIA[upload.format], headers=_headers(result, outcome.action))

    @app.post("/compute/batch", response_model=BatchResult, responses=_ERRORS)
    async def compute_batch(files: list[UploadFile] = File(..., description="the images, in order"),
                            level: LevelQuery = None, threshold: ThresholdQuery = None):
        """Score several images; one result per image, in upload order."""
        batcher = service.require_ready()
        policy = service.policy(level, threshold)
        if len(files) > settings.max_files:
            raise ServiceError(413, "too_many_files", f"{len(files)} files; the limit is {settings.max_files}")
        uploads = await asyncio.gather(*(service.read(f, f"files[{i}]") for i, f in enumerate(files)))
        outcomes = await batcher.submit(list(uploads), policy, None)
        return {"results": [service.result(u, o, policy) for u, o in zip(uploads, outcomes)]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, the model, the settings, and the batch sizes scored so far."""
        det, batcher = service.detector, service.batcher
        sizes = batcher.sizes if batcher else collections.Counter()
        return {
            "status": "ok", "ready": batcher is not None, "error": service.error,
            "model": {"id": det.model_id, "revision": det.revision} if det else None,
            "device": str(det.device) if det else None, "dtype": str(det.dtype).removeprefix("torch.") if det else None,
            "settings": {"level": settings.level, "threshold": settings.threshold,
                         "max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms},
            "queued": batcher.queued if batcher else 0,
            "batches": {"count": sum(sizes.values()), "images": sum(k * v for k, v in sizes.items()),
                        "largest": max(sizes, default=0), "sizes": {str(k): sizes[k] for k in sorted(sizes)}},
        }

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
    }


# --- command line (wired by `nsfw-safety serve`) ---------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``serve`` flags. Each defaults to its ``NSFW_SAFETY_*`` variable, then to ``Settings``."""
    d = Settings()

    def flag(name: str, dest: str, help: str, **kw) -> None:
        default = getattr(d, dest)
        shown = "" if default is None else f"; default {','.join(default) if isinstance(default, tuple) else default}"
        parser.add_argument(name, dest=dest, default=None, help=f"{help} [env {ENV[dest]}{shown}]", **kw)

    flag("--model", "model", "registry name (eva, vit-sd, vit, falconsai), hub id or checkpoint directory")
    flag("--revision", "revision", "hub revision (branch, tag or commit)")
    flag("--device", "device", "torch device, e.g. cuda, cuda:1, cpu (default: cuda when available)")
    flag("--dtype", "dtype", "bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")
    flag("--level", "level", "default level", choices=NSFW_LEVELS)
    flag("--threshold", "threshold", "default threshold in [0, 1]", type=float)
    flag("--max-batch", "max_batch_size", "most images scored together", type=int)
    flag("--max-wait-ms", "max_wait_ms", "how long an image waits for others to join its batch", type=float)
    flag("--max-upload-bytes", "max_upload_bytes", "largest accepted file", type=int)
    flag("--max-pixels", "max_pixels", "largest accepted image (width * height)", type=int)
    flag("--max-files", "max_files", "most images in one /compute/batch request", type=int)
    flag("--content-types", "content_types", "accepted upload types, comma-separated", type=_split)
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
    uvicorn.run(create_app(settings), host=host, port=port, log_level=args.log_level)
    return 0
