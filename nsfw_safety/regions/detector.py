"""The region detector: NudeNet's YOLOv8 body-part detector, run with onnxruntime on batched tensors.

It answers "where", not "whether": boxes with one of 18 class names and a score. The weights are
NudeNet's own ONNX file (``nudenet/320n.onnx`` inside the ``nudenet`` wheel, or a file the user
gives, such as the 640m model) and are never copied into this project: the nudenet project
states AGPL-3.0 for its code and model, although the wheel's metadata says MIT.

Pre- and postprocessing reproduce ``nudenet.NudeDetector.detect`` (nudenet 3.4.2) on batched
tensors, on the images' own device:

* pad the bottom and right with black to a square of side S = max(H, W), resize to the model's
  resolution (bilinear without antialiasing, half-pixel centres: OpenCV's ``INTER_LINEAR``), scale
  to [0, 1]; channels in **BGR** order, because nudenet swaps the channels of OpenCV's BGR twice;
* keep anchors whose best class score is > 0.25 (nudenet's 0.2 pre-filter, then the 0.25 of
  ``cv2.dnn.NMSBoxes``), the box labelled with that best class;
* map boxes back by S / resolution, clip them as nudenet does, and run NMS at IoU 0.45 across
  all classes of an image (``NMSBoxes`` is class-agnostic).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..vocabulary import (CLASS_SETS, DEFAULT_CLASSES, MIN_SCORE, NUDENET_LABELS,  # noqa: F401 (re-exported)
                          class_indices, per_class)

log = logging.getLogger(__name__)

NMS_IOU = 0.45
DEFAULT_RESOLUTION = 320


@dataclass(frozen=True)
class Region:
    """One detected region: class name, score, and box ``(x1, y1, x2, y2)`` in input pixels."""

    label: str
    score: float
    box: tuple[float, float, float, float]

    def to_dict(self) -> dict:
        """JSON-friendly: ``{"label": ..., "score": ..., "box": [x1, y1, x2, y2]}``."""
        return {"label": self.label, "score": self.score, "box": list(self.box)}


@dataclass(frozen=True)
class Regions:
    """The regions found in a batch of N images of H x W pixels, as device tensors.

    Attributes:
        boxes: (K, 4) float32, ``x1, y1, x2, y2`` in input pixels, inside ``[0, W] x [0, H]``.
        scores: (K,) float32 in (0, 1].
        classes: (K,) int64, indices into ``labels``.
        image: (K,) int64, the image of the batch each box belongs to; sorted, and by
            descending score within an image.
        size: (H, W) of the images.
        problems: N entries; a string where the detector could not check that image (it raised,
            returned non-finite values, or the image had a non-finite pixel). Such an image has
            no boxes and must be censored whole.
        labels: the model's class names.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    classes: torch.Tensor
    image: torch.Tensor
    size: tuple[int, int]
    problems: tuple[str | None, ...]
    labels: tuple[str, ...] = NUDENET_LABELS

    def __len__(self) -> int:
        return len(self.problems)

    def per_image(self) -> list[list[Region]]:
        """The regions of each image as Python objects (one host read)."""
        out: list[list[Region]] = [[] for _ in self.problems]
        rows = zip(self.image.tolist(), self.classes.tolist(), self.scores.tolist(), self.boxes.tolist())
        for i, c, s, b in rows:
            out[i].append(Region(self.labels[c], s, tuple(b)))
        return out

    def select(self, classes: str | Iterable[str] = DEFAULT_CLASSES,
               threshold: float | Mapping[str, float] = MIN_SCORE,
               expand: float | Mapping[str, float] = 0.0) -> Regions:
        """The regions to censor: chosen classes at or above their threshold, boxes expanded.

        Args:
            classes: a name in ``CLASS_SETS`` or class names (``labels``).
            threshold: minimum score, one for all classes or a mapping class -> score (classes
                it leaves out use ``MIN_SCORE``). Boxes under ``MIN_SCORE`` were already dropped.
            expand: growth of each box's width and height, as a fraction of it, centred (0.2 =
                20 % wider and taller), one for all or per class (default 0); clipped to the image.
        Returns:
            the kept regions, same ``size``, ``problems`` and ``labels``.
        """
        chosen = class_indices(classes, self.labels)
        thr = per_class(threshold, "threshold", chosen, self.labels, MIN_SCORE, (0.0, 1.0))
        grow = per_class(expand, "expand", chosen, self.labels, 0.0, (0.0, 10.0))
        thr = torch.tensor(thr, device=self.scores.device)
        grow = torch.tensor(grow, device=self.boxes.device)
        keep = self.scores >= thr[self.classes]
        boxes = self.boxes[keep]
        half = (boxes[:, 2:] - boxes[:, :2]) * grow[self.classes[keep]][:, None] / 2
        H, W = self.size
        x1, y1, x2, y2 = (boxes + torch.cat([-half, half], 1)).unbind(1)
        boxes = torch.stack([x1.clamp(0, W), y1.clamp(0, H), x2.clamp(0, W), y2.clamp(0, H)], 1)
        return Regions(boxes, self.scores[keep], self.classes[keep], self.image[keep], self.size,
                       self.problems, self.labels)

    def take(self, index: Sequence[int]) -> Regions:
        """The regions of images ``index`` (ascending), as a batch of ``len(index)`` images."""
        where = torch.full((len(self),), -1, dtype=torch.long)
        where[list(index)] = torch.arange(len(index))
        image = where.to(self.image.device)[self.image]
        keep = image >= 0
        return Regions(self.boxes[keep], self.scores[keep], self.classes[keep], image[keep], self.size,
                       tuple(self.problems[i] for i in index), self.labels)


def default_model_path() -> Path:
    """The 320n model inside the installed ``nudenet`` package (nudenet itself is not imported)."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or spec.origin is None:
        raise ImportError("the region detector needs NudeNet's model: pip install -e '.[regions]' in a clone "
                          "(or pass the path of a NudeNet .onnx file)")
    return Path(spec.origin).parent / "320n.onnx"


class RegionDetector:
    """NudeNet's body-part detector on batched tensors.

    One onnxruntime session per detector; ``__call__`` may be used from several threads at
    once (onnxruntime sessions are thread-safe, and each call makes its own IO binding).

    Args:
        model: path of a NudeNet YOLOv8 ``.onnx`` file; default the 320n model of the installed
            ``nudenet`` package. Class names and resolution are read from the file's Ultralytics
            metadata (``names``, ``imgsz``) when present.
        device: where the model runs; default CUDA when torch and onnxruntime both have it, else
            CPU. On CUDA the session uses the CUDA provider and is fed from the tensor's own
            memory (IO binding), so the pixels never leave the GPU.
        min_score: boxes under this score are dropped (nudenet: 0.25).
        iou: NMS overlap threshold (nudenet: 0.45).
        threads: onnxruntime's intra-op threads on the CPU (default: its own choice).
    """

    def __init__(self, model: str | os.PathLike | None = None, *, device: torch.device | str | None = None,
                 min_score: float = MIN_SCORE, iou: float = NMS_IOU, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the region detector needs onnxruntime: pip install -e '.[regions]' in a clone") from None
        from torchvision.ops import batched_nms  # seconds to import: here, not on the first call

        self._nms = batched_nms
        path = Path(model) if model is not None else default_model_path()
        if not path.is_file():
            raise FileNotFoundError(f"region detector model not found: {path}")
        if not 0 <= min_score < 1 or not 0 < iou <= 1:
            raise ValueError(f"min_score must be in [0, 1) and iou in (0, 1], got {min_score}, {iou}")
        cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        if device is None:
            device = "cuda" if torch.cuda.is_available() and cuda_ep else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path, self.min_score, self.iou = path, float(min_score), float(iou)

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        # IO binding needs the CUDA provider; without it (the CPU-only onnxruntime wheel) a CUDA
        # input's small resized batch is copied to the host, and the boxes copied back.
        self._io_binding = self.device.type == "cuda" and cuda_ep
        providers: list = ["CPUExecutionProvider"]
        if self._io_binding:
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index}))
        elif self.device.type == "cuda":
            log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu): the region "
                        "detector runs on the CPU and its %s input is copied to the host", self.device)
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        inp, out = self._session.get_inputs()[0], self._session.get_outputs()[0]
        self._input, self._output = inp.name, out.name
        meta = self._session.get_modelmeta().custom_metadata_map
        self.labels = _labels(meta)
        self.resolution = _resolution(inp.shape, meta)
        # a model exported with a fixed batch size is fed that many images at a time
        self._max_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        probe = self._session.run(None, {self._input: np.zeros((self._max_batch or 1, 3, self.resolution,
                                                                  self.resolution), np.float32)})[0]
        if probe.ndim != 3 or probe.shape[1] != 4 + len(self.labels):
            raise ValueError(f"{path} is not a YOLOv8 detector with {len(self.labels)} classes: its output "
                             f"has shape {probe.shape}, expected (N, {4 + len(self.labels)}, anchors)")
        self._anchors = probe.shape[2]

    def __repr__(self) -> str:
        return f"RegionDetector({str(self.path)!r}, resolution={self.resolution}, device={self.device})"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """nudenet's letterbox: (N, 3, H, W) RGB uint8 or float in [0, 1] -> (N, 3, R, R) float32
        BGR in [0, 1], R = ``self.resolution``, on the images' device. See :func:`letterbox`."""
        _check(images)
        return letterbox(images, self.resolution).flip(1)

    def __call__(self, images: torch.Tensor) -> Regions:
        """Detect regions.

        Args:
            images: (N, 3, H, W) RGB, float in [0, 1] or uint8, on any device.
        Returns:
            :class:`Regions` on the images' device. An image whose run raised or gave
            non-finite values has a ``problems`` entry and no boxes.
        """
        blob = self.preprocess(images)
        N, (H, W) = images.shape[0], images.shape[-2:]
        step = self._max_batch or max(1, N)
        outs, problems = [], [None] * N
        for start in range(0, N, step):
            chunk = blob[start:start + step]
            try:
                # a fixed-batch model's last chunk is padded with black images
                raw = self._run(F.pad(chunk, (0, 0, 0, 0, 0, 0, 0, step - len(chunk))))[:len(chunk)]
            except Exception as e:  # fail closed: the caller censors these images whole
                log.warning("region detector failed on images %d..%d: %s", start, start + len(chunk) - 1, e)
                raw = torch.full((len(chunk), 4 + len(self.labels), self._anchors), float("nan"))
                problems[start:start + len(chunk)] = [f"region detector failed: {type(e).__name__}: {e}"] * len(chunk)
            outs.append(raw.to(images.device))
        raw = torch.cat(outs)
        if raw.shape[1:] != (4 + len(self.labels), self._anchors):
            raise RuntimeError(f"region detector output has shape {tuple(raw.shape)}, expected "
                               f"(N, {4 + len(self.labels)}, {self._anchors})")
        # NaN/inf pixels the resize happens to skip would still be shown to a viewer
        finite_input = (torch.isfinite(images.flatten(1)).all(1) if images.is_floating_point()
                        else torch.ones(N, dtype=torch.bool, device=images.device))
        return self._postprocess(raw, (H, W), problems, finite_input)

    def _run(self, blob: torch.Tensor) -> torch.Tensor:
        """(n, 3, R, R) float32 -> (n, 4 + C, anchors) float32, on the session's device."""
        if not self._io_binding:
            return torch.from_numpy(self._session.run([self._output], {self._input: blob.cpu().numpy()})[0])
        # Untested here (no GPU with onnxruntime-gpu on the team's machines): written to
        # onnxruntime's IO binding API, guarded by the CUDA provider check in __init__.
        blob = blob.to(self.device).contiguous()
        out = torch.empty((blob.shape[0], 4 + len(self.labels), self._anchors), device=self.device)
        binding = self._session.io_binding()
        binding.bind_input(self._input, "cuda", self.device.index, np.float32, tuple(blob.shape), blob.data_ptr())
        binding.bind_output(self._output, "cuda", self.device.index, np.float32, tuple(out.shape), out.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # onnxruntime reads on its own stream
        self._session.run_with_iobinding(binding)  # returns once its stream has finished
        return out

    def _postprocess(self, raw: torch.Tensor, size: tuple[int, int], problems: list[str | None],
                     finite_input: torch.Tensor) -> Regions:
        """raw: (N, 4 + C, A) -> Regions, as nudenet's ``_postprocess`` does per image."""
        H, W = size
        N, dev = raw.shape[0], raw.device
        finite_output = torch.isfinite(raw).flatten(1).all(1)
        finite = finite_input.to(dev) & finite_output
        pred = raw.transpose(1, 2)  # (N, A, 4 + C)
        scores, classes = pred[..., 4:].max(-1)
        cx, cy, w, h = pred[..., :4].unbind(-1)
        scale = max(H, W) / self.resolution
        x, y = ((cx - w / 2) * scale).clamp(0, W), ((cy - h / 2) * scale).clamp(0, H)
        # nudenet clips the corner but keeps the width, so a box crossing the left or top edge
        # grows on the other side (it covers more, never less, than the model's box)
        w, h = torch.minimum(w * scale, W - x), torch.minimum(h * scale, H - y)
        boxes = torch.stack([x, y, x + w, y + h], -1)
        keep = (scores > self.min_score) & finite[:, None]
        image = torch.arange(N, device=dev)[:, None].expand_as(keep)[keep]
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]  # shapes depend on data from here
        kept = self._nms(boxes, scores, image, self.iou)  # by descending score
        kept = kept[torch.sort(image[kept], stable=True).indices]
        flags = torch.stack([~finite_input.to(dev), ~finite_output], 1).tolist()
        problems = [p or ("non-finite input" if bad_in else "region detector returned non-finite values" if bad_out
                          else None) for p, (bad_in, bad_out) in zip(problems, flags)]
        return Regions(boxes[kept], scores[kept], classes[kept], image[kept], (H, W), tuple(problems), self.labels)


def letterbox(images: torch.Tensor, R: int) -> torch.Tensor:
    """Pad to a square at the bottom and right with black, resize to R x R, scale to [0, 1]: as
    OpenCV's ``copyMakeBorder`` then ``resize(INTER_LINEAR)`` (what nudenet does), batched.

    uint8 images follow OpenCV's fixed-point arithmetic (11-bit weights, the vertical pass
    rounded as its SIMD code rounds): bit for bit the blob nudenet makes on x86 builds. Float
    images are interpolated in float32 with the same taps.

    Only the output rows and columns that fall inside the image are computed, and the padded
    square is never built, so a 1 x 100000 strip costs no more memory than the strip itself.

    Args:
        images: (N, C, H, W) uint8, or float in [0, 1].
    Returns:
        (N, C, R, R) float32 in [0, 1].
    """
    N, C, H, W = images.shape
    S = max(H, W)
    fixed = images.dtype == torch.uint8
    r0, r1, b0, b1 = _device_taps(R, S, H, True, fixed, images.device)
    c0, c1, a0, a1 = _device_taps(R, S, W, False, fixed, images.device)
    top, bottom = images.index_select(2, r0), images.index_select(2, r1)  # (N, C, kr, W)
    if fixed:
        def across(rows: torch.Tensor) -> torch.Tensor:  # horizontal pass, x 2048, then >> 4 to int16 range
            return (rows.index_select(3, c0).int() * a0 + rows.index_select(3, c1).int() * a1) >> 4
        v = ((across(top) * b0[:, None]) >> 16) + ((across(bottom) * b1[:, None]) >> 16)
        x = ((v + 2) >> 2).clamp(0, 255).float() / 255
    else:
        def across(rows: torch.Tensor) -> torch.Tensor:
            return rows.index_select(3, c0).float() * a0 + rows.index_select(3, c1).float() * a1
        x = across(top) * b0[:, None] + across(bottom) * b1[:, None]
    return F.pad(x, (0, R - x.shape[3], 0, R - x.shape[2]))  # the rest samples the black padding


@functools.lru_cache(maxsize=64)
def _device_taps(R: int, S: int, L: int, rows: bool, fixed: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """:func:`_taps` as tensors on ``device``, kept (no copy to the device per call); the weights
    as OpenCV's 11-bit integers when ``fixed``."""
    i0, i1, w0, w1 = _taps(R, S, L, rows)
    if fixed:
        w0, w1 = (np.rint(w * 2048).astype(np.int32) for w in (w0, w1))
    return tuple(torch.as_tensor(t, device=device) for t in (i0, i1, w0, w1))


def _taps(R: int, S: int, L: int, rows: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's INTER_LINEAR taps for resizing an axis of the padded length S to R, where only
    the first L pixels are image (the rest is black padding).

    Returns (i0, i1, w0, w1), each (k,), for the k output positions whose first tap is inside
    the image (a prefix; the others read only padding): int64 indices into the image, and
    float32 weights, 0 for taps in the padding.
    """
    src = ((np.arange(R) + 0.5) * (1 / (R / S)) - 0.5).astype(np.float32)
    i0 = np.floor(src).astype(np.int64)
    f = src - i0.astype(np.float32)
    if not rows:  # OpenCV clamps the columns' fraction at the edges; rows are clamped by index only
        f = np.where((i0 < 0) | (i0 >= S - 1), np.float32(0), f)
        i0 = np.clip(i0, 0, S - 1)
    i1 = np.clip(i0 + 1, 0, S - 1)
    i0 = np.clip(i0, 0, S - 1)
    k = int(np.searchsorted(i0, L))  # i0 never decreases
    w0, w1 = (np.float32(1) - f)[:k], f[:k]
    w0, w1 = np.where(i0[:k] < L, w0, 0), np.where(i1[:k] < L, w1, 0)
    return np.minimum(i0[:k], L - 1), np.minimum(i1[:k], L - 1), w0, w1


def _labels(meta: Mapping[str, str]) -> tuple[str, ...]:
    if "names" in meta:
        names = ast.literal_eval(meta["names"])
        return tuple(names[i] for i in sorted(names))
    return NUDENET_LABELS


def _resolution(shape: Sequence, meta: Mapping[str, str]) -> int:
    if isinstance(shape[2], int) and shape[2] == shape[3]:
        return shape[2]
    if "imgsz" in meta:
        h, w = ast.literal_eval(meta["imgsz"])
        if h == w:
            return int(h)
    return DEFAULT_RESOLUTION


def _check(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0 or min(images.shape[-2:]) == 0:
        raise ValueError(f"images must be (N, 3, H, W) with N, H, W > 0, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
