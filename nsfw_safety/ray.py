"""Ray Data: score and censor image datasets of any size, on one machine or a cluster.

    import ray
    from nsfw_safety.ray import read_images, score_dataset
    ds = read_images("s3://bucket/generated/")          # or read_parquet_images, read_webdataset_images, from_hf
    rows = score_dataset(ds, model="eva", level="medium", threshold=0.5)
    rows.write_parquet("s3://bucket/nsfw-report/")

The same path as every other caller, split across Ray's workers:

* **Decode** runs in stateless CPU tasks: :func:`nsfw_safety.inputs.open_image`, with its pixel
  limit, its format rules and its errors. An unreadable or hostile file becomes an error row.
  An animation (``MultiFrameImage``) or a video file (by extension, as the local scan finds
  them) is not decoded there: its bytes go on to the actor.
* **Score and censor** run in an actor pool (``map_batches`` with a callable class): each actor
  builds its :class:`~nsfw_safety.SafetyFilter` as the local ``scan`` does
  (:func:`nsfw_safety.scan.run.load_filter`: the detector, its second opinion, region mode) and
  calls it once per batch. An animation or video is written to a temporary file and checked
  frame by frame by :func:`nsfw_safety.video.check_video` (decoded and scored in chunks: memory
  does not grow with its length), its row filled as the local scan fills it
  (:func:`nsfw_safety.scan.run.video_values`); the file is deleted whatever happens. With GPUs in the cluster there is one actor per GPU (``num_gpus=1``,
  bf16); without, CPU actors.

Every input row gives exactly one output row (:data:`COLUMNS`). Fault tolerance is Ray's own,
with its defaults: a decode task whose worker dies is retried (Ray core's ``max_retries=3``),
and Ray Data's actor pool restarts a dead actor and retries its batches (``max_restarts=-1``,
``max_task_retries=-1``); nothing here re-implements it.

:func:`scan_to_parquet` adds resume: results go to Parquet files in one folder, and a re-run
skips the ids already written there.

Imported only with the ``ray`` extra (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import ray
import ray.data

from .inputs import MultiFrameImage, open_image
from .scan import walk
from .vocabulary import MIN_SCORE, SHAPES

log = logging.getLogger(__name__)

#: Image file extensions read by :func:`read_images` (the local scan's set).
IMAGE_EXTENSIONS = tuple(e.lstrip(".") for e in walk.IMAGE_EXTENSIONS)
#: Video file extensions read by :func:`read_images`, checked frame by frame (the local scan's set;
#: animations are found by content).
VIDEO_EXTENSIONS = tuple(e.lstrip(".") for e in walk.VIDEO_EXTENSIONS)
#: One output row per input row. ``probs``, ``parts`` and ``regions`` are JSON text, ``""`` when
#: there is none: ``parts`` with a second opinion, each model's own scores (a list of ``{"model",
#: "scored", "levels", "probs", "problem"}``, the local scan's JSONL ``parts``); ``regions`` in
#: region mode, the regions the image is censored in (a list of ``{"label", "score", "box"}``, box
#: in the image's pixels; ``[]`` for none, as in the local scan's JSONL); ``frames`` for an
#: animation or video, "checked/total" frames (``""`` for a still image; its levels are the max
#: over its frames, its regions the first flagged frame's).
COLUMNS = ("id", "size", "width", "height", "frames", "status", "flagged", "neutral", "low", "medium", "high",
           "probs", "reason", "action", "model", "revision", "parts", "regions")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit, as in `scan`


# --- readers: every one gives rows {"id": str, "bytes": binary} ------------------------------

def read_images(paths: str | Sequence[str], *, filesystem: Any = None,
                extensions: Sequence[str] = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS) -> ray.data.Dataset:
    """Image and video files under folders (recursively) or listed paths, on any filesystem
    pyarrow reads (local, ``s3://``, ``gs://``...). The id is the file's path."""
    ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=filesystem,
                                    file_extensions=list(extensions))
    return ds.rename_columns({"path": "id"})


def read_parquet_images(paths: str | Sequence[str], *, image_column: str = "image",
                        id_column: str | None = "id", filesystem: Any = None) -> ray.data.Dataset:
    """Parquet files with an image-bytes column: plain binary, or the ``{"bytes", "path"}`` struct
    that Hugging Face ``datasets`` writes for an ``Image`` feature. Without ``id_column`` the id is
    ``<file>#<row>``."""
    ds = ray.data.read_parquet(paths, filesystem=filesystem, include_paths=id_column is None)
    return ds.map_batches(_Standardize(image_column, id_column), batch_format="pyarrow")


def read_webdataset_images(paths: str | Sequence[str], *, filesystem: Any = None,
                           extensions: Sequence[str] = IMAGE_EXTENSIONS) -> ray.data.Dataset:
    """WebDataset tar shards: one row per sample, the first member whose extension is an image's;
    the id is ``<shard>/<key>``. A sample with no image member is an error row."""
    ds = ray.data.read_webdataset(paths, filesystem=filesystem, decoder=None, include_paths=True)
    return ds.map_batches(_webdataset_rows, fn_kwargs={"extensions": tuple(extensions)},
                          batch_format="pyarrow")


def from_hf(dataset: Any, *, image_column: str = "image", id_column: str | None = None) -> ray.data.Dataset:
    """A Hugging Face ``datasets.Dataset`` with an ``Image`` (or bytes) column. Without
    ``id_column`` the id is the row number."""
    if id_column is None:
        id_column = "__row"
        dataset = dataset.add_column(id_column, [str(i) for i in range(len(dataset))])
    return ray.data.from_huggingface(dataset).map_batches(_Standardize(image_column, id_column),
                                                           batch_format="pyarrow")


class _Standardize:
    """pyarrow batch -> {"id", "bytes"}; an image column may be binary or a {"bytes", "path"} struct."""

    def __init__(self, image_column: str, id_column: str | None):
        self.image_column, self.id_column = image_column, id_column

    def __call__(self, batch):
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.image_column not in batch.column_names:
            raise KeyError(f"no column {self.image_column!r} in {batch.column_names}")
        images = batch[self.image_column]
        if pa.types.is_struct(images.type):
            images = pc.struct_field(images, "bytes")
        if self.id_column is not None:
            ids = pc.cast(batch[self.id_column], pa.string())
        else:
            ids = [f"{p}#{i}" for i, p in enumerate(batch["path"].to_pylist())]
        return pa.table({"id": ids, "bytes": pc.cast(images, pa.binary())})


def _webdataset_rows(batch, extensions: tuple[str, ...]):
    import pyarrow as pa

    rows = batch.to_pylist()
    ids, data = [], []
    for row in rows:
        ids.append(f"{row.get('__url__') or row.get('path') or ''}/{row['__key__']}")
        member = next((k for k in row if k.rsplit(".", 1)[-1].lower() in extensions and row[k] is not None), None)
        data.append(row[member] if member is not None else None)
    return pa.table({"id": pa.array(ids, pa.string()), "bytes": pa.array(data, pa.binary())})


# --- decode (CPU tasks) and score (actors) ----------------------------------------------------

def _decode(batch: dict[str, np.ndarray], max_pixels: int) -> dict[str, np.ndarray]:
    """Runs in a CPU task: bytes -> PIL image, or the reason it cannot be read; an animation or a
    video keeps its bytes (``moving``: the suffix its temporary file takes), for ``check_video``."""
    images, errors, sizes, moving, data_out = [], [], [], [], []
    for key, data in zip(batch["id"], batch["bytes"]):
        sizes.append(0 if data is None else len(data))
        image, error, suffix = None, "", ""
        try:
            if not data:
                raise ValueError("empty file (0 bytes)")
            ext = os.path.splitext(str(key))[1].lower()
            if ext.lstrip(".") in VIDEO_EXTENSIONS:
                suffix = ext
            else:
                try:
                    image = open_image(io.BytesIO(data), max_pixels, name=str(key))
                except MultiFrameImage:
                    suffix = _animation_suffix(data)
        except Exception as e:  # noqa: BLE001 -- any failure is an error row, never a crash or a pass
            error = f"error: {e}" if isinstance(e, ValueError) else f"error: {type(e).__name__}: {e}"
        images.append(image)
        errors.append(error)
        moving.append(suffix)
        data_out.append(data if suffix else None)
    return {"id": batch["id"], "size": np.array(sizes, dtype=np.int64), "image": _objects(images),
            "error": np.array(errors, dtype=object), "moving": np.array(moving, dtype=object),
            "data": _objects(data_out)}


def _animation_suffix(data: bytes) -> str:
    """The suffix of an animation's format (".gif", ".png", ".webp"...): its censored copy keeps it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return "." + (im.format or "bin").lower()


def _objects(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


class _Scorer:
    """An actor: one SafetyFilter, built as the local scan builds it, a batch of decoded images per call."""

    def __init__(self, opts: Any, censor: bool):
        from .scan.run import _parts, load_filter

        self.guard = load_filter(opts, opts.action)
        self.detector = self.guard.detector
        self.censor = censor
        self.max_pixels = opts.max_pixels
        self.parts = _parts  # each model's own scores, as the local scan's rows give them

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        rows = [_row(key, size) for key, size in zip(batch["id"], batch["size"])]
        good = [i for i in range(n) if not batch["error"][i] and not batch["moving"][i]]
        for i in range(n):
            if batch["error"][i]:
                rows[i].update(status="error", flagged=True, reason=batch["error"][i])
        censored: list[bytes | None] = [None] * n
        if good:
            images = [batch["image"][i] for i in good]
            result = self.guard(images)  # fails closed: a batch that raises comes back blocked
            dicts = result.scores.to_dicts() if result.scores is not None else [None] * len(good)
            parts = self.parts(result.scores, len(good))
            for j, i in enumerate(good):
                scored = dicts[j] is not None and dicts[j]["problem"] is None
                rows[i].update(
                    width=images[j].width, height=images[j].height, flagged=result.flagged[j],
                    status=("flagged" if result.flagged[j] else "ok") if scored else "error",
                    reason=result.reasons[j], action=result.actions[j],
                    probs=json.dumps(dicts[j]["probs"]) if dicts[j] is not None else "",
                    parts=json.dumps(parts[j]) if parts[j] is not None else "",
                    regions=json.dumps([r.to_dict() for r in result.regions[j]]) if result.regions is not None else "",
                    **({k: float(v) for k, v in dicts[j]["levels"].items()} if scored else {}))
                if self.censor and result.actions[j] != "none":
                    censored[i] = _encode(result.images[j], images[j].format)
        for i in range(n):
            if batch["moving"][i] and not batch["error"][i]:
                censored[i] = self._moving(rows[i], batch["data"][i], batch["moving"][i])
        out = {c: np.array([r[c] for r in rows], dtype=object) for c in COLUMNS}
        for c in ("size", "width", "height"):
            out[c] = np.array([-1 if r[c] is None else r[c] for r in rows], dtype=np.int64)
        for c in ("neutral", "low", "medium", "high"):
            out[c] = np.array([np.nan if r[c] is None else r[c] for r in rows], dtype=np.float64)
        out["flagged"] = np.array([r["flagged"] for r in rows], dtype=bool)
        out["model"] = np.array([self.detector.model_id] * n, dtype=object)
        out["revision"] = np.array([self.detector.revision or ""] * n, dtype=object)
        if self.censor:
            out["censored"] = _objects(censored)
        return out

    def _moving(self, row: dict[str, Any], data: bytes, suffix: str) -> bytes | None:
        """Check an animation or video frame by frame, as the local scan does: ``row`` filled in
        place; returns its censored copy (same format) when asked and made, else None."""
        import tempfile

        # lazy: PyAV and the video module only when an animation or video is met
        from .frames import VideoLimits
        from .frames import write_censored as write_censored_video
        from .scan.run import _without_path, first_flagged, video_values
        from .video import check_video

        key = str(row["id"])
        with tempfile.TemporaryDirectory(prefix="nsfw-safety-") as tmp:  # removed whatever happens
            path = os.path.join(tmp, "input" + suffix)
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                result = check_video(path, self.guard, limits=VideoLimits(max_pixels=self.max_pixels))
            except Exception as e:  # noqa: BLE001 -- not checked at all: an error row with the reason
                msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
                row.update(status="error", flagged=True, reason="error: " + _without_path(msg, path))
                return None
            failed = result.error is not None or result.levels is None
            first = (first_flagged(path, result, self.guard)
                     if result.flagged and not failed and self.guard.regions is not None else None)
            values = video_values(result, self.guard, first)
            values["reason"] = values["reason"].replace(path, key)  # never the temporary file's name
            values.pop("models", None)  # the report's column, made from parts
            if values.get("parts") is not None:
                values["parts"] = json.dumps(values["parts"])
            if "regions" in values:
                values["regions"] = json.dumps(values["regions"])
            row.update(values)
            # frames were censored in the check (its actions) only for a check that finished
            row["action"] = self.guard.action if result.flagged and not failed else "none"
            if not (self.censor and result.flagged):
                return None
            if failed:
                row["reason"] += "; no censored copy: the check did not finish"
                return None
            try:
                copy = write_censored_video(path, result, os.path.join(tmp, "censored" + suffix), self.guard)
                return copy.read_bytes()
            except Exception as e:  # noqa: BLE001 -- a format that cannot be written...: no copy, said so
                row.update(status="error", flagged=True, action="none",
                           reason=f"{row['reason']}; error writing the censored copy: {str(e).replace(path, key)}")
                return None


def _row(key: str, size: int) -> dict[str, Any]:
    return {"id": key, "size": size, "width": None, "height": None, "frames": "", "status": "", "flagged": True,
            "neutral": None, "low": None, "medium": None, "high": None, "probs": "", "reason": "",
            "action": "none", "model": "", "revision": "", "parts": "", "regions": ""}


def _encode(image: Any, fmt: str | None) -> bytes:
    """A censored image in its input's format (PNG when that format cannot be written)."""
    from PIL import Image

    fmt = fmt if fmt in Image.SAVE else "PNG"
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def score_dataset(ds: ray.data.Dataset, model: str = "eva", *, level: str = "medium", threshold: float = 0.5,
                  thresholds: Mapping[str, float] | None = None, action: str = "blur", censor: bool = False,
                  revision: str | None = None, device: str | None = None, dtype: str | None = None,
                  batch_size: int = 16, actors: int | None = None, num_gpus: float | None = None,
                  num_cpus: float | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                  second_opinion: str | None = None, band: tuple[float, float] | None = None,
                  combine: str | None = None, regions: str | Sequence[str] | None = None,
                  region_model: str | None = None, region_threshold: float | Mapping[str, float] = MIN_SCORE,
                  region_expand: float | Mapping[str, float] = 0.0, region_shape: str = SHAPES[0],
                  region_feather: float = 0.0) -> ray.data.Dataset:
    """Score (and optionally censor) every image of ``ds``.

    Args:
        ds: rows with ``id`` (str) and ``bytes`` (the encoded image), as the readers here give.
        model, revision, device, dtype: as for :func:`nsfw_safety.load_detector`, in each actor.
        level, threshold, thresholds, action: as for :class:`nsfw_safety.SafetyFilter`.
        second_opinion, band, combine: a second model (a registry name, hub id, or checkpoint
            folder every worker can read) that re-checks the images whose first score at
            ``level`` is in ``band``, combined by ``combine``, as ``scan --second-opinion``
            (:func:`nsfw_safety.cascade.second_opinion`); None: one model.
        regions, region_model, region_threshold, region_expand, region_shape, region_feather:
            region mode, as ``scan --regions`` and :class:`nsfw_safety.regions.RegionSettings`'s
            classes, detector (an ``.onnx`` path every worker can read; None: the ``nudenet``
            package's), threshold, expand, shape and feather; None: off.
        censor: add a ``censored`` column: the censored image, encoded in its input's format,
            for flagged rows (None for the others); for an animation or video, its censored copy
            in its own format (:func:`nsfw_safety.frames.write_censored`), None when its check did
            not finish (the reason says no copy was made).
        batch_size: images per model call in an actor.
        actors: actor pool size; default: one per GPU in the cluster, else one per 4 CPUs (at
            least one).
        num_gpus, num_cpus: resources of each actor; default: 1 GPU each when the cluster has
            GPUs, else 1 CPU.
        max_pixels: larger images (and animation or video frames) are error rows, refused from
            their header before decoding.
    Returns:
        One row per input row, columns :data:`COLUMNS` (+ ``censored``): status is ``ok``,
        ``flagged`` or ``error``; an error row is flagged (fail closed).
    Raises:
        ValueError: a bad policy, second opinion or region setting (here, before any actor starts).
    """
    # here, not in an actor: a broken core or a bad setting fails at once
    from .levels import Policy
    from .options import check_regions, check_second_opinion
    from .scan.run import ScanOptions

    regions = regions if regions is None or isinstance(regions, str) else tuple(regions)
    check_regions(regions, region_model, region_threshold, region_expand, region_shape, region_feather)
    opts = ScanOptions(
        paths=(), model=model, revision=revision, device=device, dtype=dtype or "auto", batch_size=batch_size,
        policy=Policy(level, threshold, thresholds), action=action, max_pixels=max_pixels,
        second_opinion=second_opinion, band=check_second_opinion(second_opinion, band, combine), combine=combine,
        regions=regions, region_model=region_model, region_threshold=region_threshold, region_expand=region_expand,
        region_shape=region_shape, region_feather=region_feather)

    gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if num_gpus is None and num_cpus is None:
        num_gpus, num_cpus = (1, None) if gpus else (None, 1)
    if actors is None:
        cpus = ray.cluster_resources().get("CPU", 1) if ray.is_initialized() else 1
        actors = int(gpus // (num_gpus or 1)) if num_gpus else max(1, int(cpus // 4))
    # decode in tasks that ask for less CPU than an actor: Ray then does not fuse them into the pool
    decoded = ds.map_batches(_decode, fn_kwargs={"max_pixels": max_pixels}, batch_format="numpy",
                             batch_size=batch_size, num_cpus=0.5)
    return decoded.map_batches(
        _Scorer, fn_constructor_kwargs={"opts": opts, "censor": censor},
        batch_format="numpy", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=num_gpus, num_cpus=num_cpus)


# --- resumable scans --------------------------------------------------------------------------

def done_ids(out_dir: str | os.PathLike) -> set[str]:
    """The ids already written to the Parquet files in ``out_dir``.

    A file that cannot be read (cut short when its writer was killed: Parquet's footer comes
    last) is removed, so its rows are scored again; a complete file is never rewritten.
    """
    import pyarrow.parquet as pq

    done: set[str] = set()
    folder = Path(out_dir)
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        try:
            done.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
        except Exception as e:  # noqa: BLE001 -- pyarrow raises several kinds on a torn file
            log.warning("removing %s, cut short by an earlier run (%s); its rows are scored again", path, e)
            path.unlink()
    return done


def scan_to_parquet(ds: ray.data.Dataset, out_dir: str | os.PathLike, **settings: Any) -> dict[str, int]:
    """Score ``ds`` into Parquet files in ``out_dir``, skipping the ids already there.

    Safe to re-run after a crash or a SIGKILL of the driver: complete files are kept, a torn
    one is removed (see :func:`done_ids`), and only the missing ids are scored, so the folder
    ends with exactly one row per input id. ``out_dir`` is a local folder; ``settings`` are
    those of :func:`score_dataset`.

    Returns:
        ``{"skipped": ids already done, "scored": rows written now}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = done_ids(out)
    if done:
        import pyarrow as pa

        ds = ds.map_batches(_without_done, fn_kwargs={"done": pa.array(sorted(done), pa.string())},
                            batch_format="pyarrow")
    rows = score_dataset(ds, **settings)
    before = set(out.glob("*.parquet"))
    rows.write_parquet(str(out))
    import pyarrow.parquet as pq

    scored = sum(pq.ParquetFile(p).metadata.num_rows for p in set(out.glob("*.parquet")) - before)
    return {"skipped": len(done), "scored": scored}


def _without_done(batch, done):
    import pyarrow.compute as pc

    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=done)))
