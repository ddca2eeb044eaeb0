"""The CUDA path on emulated CUDA, on any machine: no host sync, no device mismatch.

Under torch's ``FakeTensorMode`` a tensor has a device and a dtype but no data, so a CPU-only
machine can run the scoring path on "CUDA" tensors. Mixing devices raises exactly as on a GPU,
and every read of device data on the host (``.item()``, ``.tolist()``, ``bool(t)``, a
data-dependent shape) raises ``DataDependentOutputException``: on a GPU each would be a host
sync. A dispatch mode on top records the host reads and every copy between host and device, in
order, with the model's forward passes. So any future host copy or sync on the hot path fails CI.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nsfw_safety import SafetyFilter, device_cache, inputs
from nsfw_safety.censor import ACTIONS, censor, default_card
from nsfw_safety.detector import Detector
from nsfw_safety.models import load_model

CUDA = torch.device("cuda", 0)
# a read of one value on the host; inference tensors (scores) dispatch `item` itself
_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)
# explicit copies; inference tensors dispatch `to` itself rather than `_to_copy`
_COPIES = (torch.ops.aten._to_copy, torch.ops.aten.copy_, torch.ops.aten.to, torch.ops.aten.lift_fresh)


class HostTraffic(TorchDispatchMode):
    """Records, in ``events``, each host read (``"read"``) and each tensor that crosses between host
    and device (``("h2d" | "d2h", numel)``), in order; the tests add ``"forward"`` when the model ran.

    With ``answer_reads`` a host read is answered (True, 0 or 1.0 by dtype) instead of raising,
    so that code meant to read the host once, after the model, can run to its end.
    """

    def __init__(self, answer_reads: bool = False):
        super().__init__()
        self.events: list = []
        self.answer_reads = answer_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self.events.append("read")
            if self.answer_reads:
                t = args[0]
                return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 0
        out = func(*args, **kwargs)
        dst = {t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        if len(dst) == 1:
            (dst,) = dst
            for t in tree_leaves((args, kwargs)):
                # a 0-dim CPU tensor in a device op is a kernel argument, not a copy
                if isinstance(t, torch.Tensor) and t.device.type != dst and (
                        t.dim() > 0 or func.overloadpacket in _COPIES):
                    self.events.append(("h2d" if dst == "cuda" else "d2h", t.numel()))
        return out

    def reads(self) -> int:
        return self.events.count("read")

    def copies(self, kind: str) -> list[int]:
        return [e[1] for e in self.events if isinstance(e, tuple) and e[0] == kind]


@pytest.fixture
def fake_cuda():
    """Emulated CUDA for one test. Per-device caches filled in it hold fake tensors: cleared after."""
    default_card()  # lru-cached: made on the real CPU, not inside the mode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield mode
    device_cache._CACHE.clear()


def emulated_detector(path, traffic: HostTraffic | None = None, *, max_batch_size: int = 32) -> Detector:
    """A detector loaded on the CPU in bf16, then moved to the emulated GPU with ``Detector.to``;
    each forward pass is recorded in ``traffic``.

    Call inside ``fake_cuda``. Loading and the cast happen on the real CPU (timm's initialization
    reads data; a fake tensor cannot be cast in place).
    """
    with unset_fake_temporarily():
        det = Detector(load_model(path, "tiny", None, None), max_batch_size=max_batch_size)
        det.to(dtype="bf16")
    det.to("cuda")
    assert det.device == CUDA and det.dtype == torch.bfloat16
    assert all(isinstance(p, torch._subclasses.FakeTensor) for p in det.model.parameters())
    # The detector copies its constants to a new device once, on first use. Its level matrix is
    # copied inside torch.inference_mode(), where FakeTensorMode runs the copy of a real CPU
    # tensor for real (and fails: there is no GPU); make that copy here, outside. Then warm up,
    # as on a GPU: the hot path is every call after the first.
    det._on(det.device)
    det.predict(cuda(1, 3, 64, 64))
    if traffic is not None:
        det.model.register_forward_hook(lambda *_: traffic.events.append("forward"))
    return det


def cuda(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(*shape, device="cuda", dtype=dtype)


# --- the detector --------------------------------------------------------------------------

INPUTS = {  # name: (images, predict kwargs, batch size)
    "vae output (B,3,512,512) fp16 in [-1, 1]": (lambda: cuda(4, 3, 512, 512, dtype=torch.float16),
                                                  {"value_range": (-1, 1)}, 4),
    "vae output bf16": (lambda: cuda(2, 3, 512, 512, dtype=torch.bfloat16), {"value_range": (-1, 1)}, 2),
    "ComfyUI IMAGE (B,H,W,3) fp32": (lambda: cuda(3, 512, 640, 3), {}, 3),
    "uint8 (B,3,H,W)": (lambda: cuda(2, 3, 512, 512, dtype=torch.uint8), {}, 2),
    "uint8 (B,H,W,3)": (lambda: cuda(2, 384, 512, 3, dtype=torch.uint8), {}, 2),
    "gray (B,1,H,W)": (lambda: cuda(2, 1, 256, 256), {}, 2),
    "RGBA (B,4,H,W)": (lambda: cuda(2, 4, 256, 256), {}, 2),
    "mixed sizes, a list": (lambda: [cuda(3, 512, 512), cuda(3, 300, 700)], {}, 2),
}


@pytest.mark.parametrize("name", list(INPUTS))
def test_predict_on_emulated_cuda(eva_dir, fake_cuda, name):
    traffic = HostTraffic()
    det = emulated_detector(eva_dir, traffic)
    images, kwargs, b = INPUTS[name]
    with traffic:
        scores = det.predict(images(), **kwargs)
    assert traffic.events == ["forward"]  # no host read, no copy either way
    assert scores.levels.device == scores.probs.device == scores.status.device == CUDA
    assert scores.levels.shape == (b, 4) and scores.probs.shape == (b, 4) and scores.status.shape == (b,)
    assert scores.levels.dtype == scores.probs.dtype == torch.float32 and scores.status.dtype == torch.int8


def test_chunks_never_sync_between_them(eva_dir, fake_cuda):
    traffic = HostTraffic()
    det = emulated_detector(eva_dir, traffic, max_batch_size=2)
    with traffic:
        scores = det.predict(cuda(5, 3, 512, 512, dtype=torch.float16), value_range=(-1, 1))
    assert traffic.events == ["forward"] * 3  # chunks of 2, 2 and 1
    assert scores.levels.shape == (5, 4) and scores.levels.device == CUDA


def test_two_class_vit_on_emulated_cuda(vit_dir, fake_cuda):
    traffic = HostTraffic()
    det = emulated_detector(vit_dir, traffic)
    with traffic:
        scores = det.predict(cuda(2, 3, 512, 512, dtype=torch.float16), value_range=(-1, 1))
    assert traffic.events == ["forward"]
    assert scores.probs.shape == (2, 2) and scores.levels.shape == (2, 4) and scores.levels.device == CUDA


def test_a_host_batch_crosses_to_the_device_once(eva_dir, fake_cuda):
    traffic = HostTraffic()
    det = emulated_detector(eva_dir, traffic)
    host = torch.zeros(2, 512, 512, 3, dtype=torch.uint8)  # a real CPU tensor, e.g. decoded files
    with traffic:
        scores = det.predict(host)
    assert traffic.events == [("h2d", host.numel()), "forward"]
    assert scores.levels.device == CUDA


# --- the filter: one host read, after the model ----------------------------------------------

@pytest.mark.parametrize("action", ["blur", "black"])
def test_filter_reads_the_host_only_after_the_model(eva_dir, fake_cuda, action):
    traffic = HostTraffic(answer_reads=True)
    det = emulated_detector(eva_dir, traffic, max_batch_size=2)
    guard = SafetyFilter(det, action=action, on_error="raise")
    x = cuda(4, 3, 512, 512, dtype=torch.float16)
    with traffic:
        out = guard(x, value_range=(-1, 1))
    events = traffic.events
    first_read = events.index("read")
    # the model ran (two chunks); before the first read only the verdict's one copy to the host
    assert events[:2] == ["forward", "forward"], events
    assert all(isinstance(e, tuple) and e[0] == "d2h" for e in events[2:first_read]), events
    assert "forward" not in events[first_read:]
    # only scores come to the host, never pixels: B x (flag, 4 levels, status, 4 composites) at most
    assert traffic.copies("d2h") and max(traffic.copies("d2h")) <= 4 * 10, events
    assert out.flagged == [True] * 4 and out.actions == [action] * 4  # the answered read: all flagged
    assert out.reasons == ["medium 1.00 >= 0.50"] * 4
    assert out.images.device == CUDA and out.images.shape == x.shape and out.images.dtype == x.dtype


# --- censoring and restoring ----------------------------------------------------------------

@pytest.mark.parametrize("action", [a for a in ACTIONS if a != "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_censor_actions_on_emulated_cuda(fake_cuda, action, dtype):
    x = cuda(3, 3, 512, 384, dtype=dtype)
    traffic = HostTraffic()
    with traffic:
        y = censor(x, action)
    assert traffic.reads() == 0 and traffic.copies("d2h") == []
    # only host-side settings go to the device (a fill colour, the placeholder card), never the images
    assert all(n <= default_card().numel() for n in traffic.copies("h2d"))
    assert y.device == CUDA and y.shape == x.shape and y.dtype == dtype


RESTORE = {  # name: (input, value_range)
    "vae output fp16 in [-1, 1]": (lambda: cuda(4, 3, 512, 512, dtype=torch.float16), (-1, 1)),
    "ComfyUI (B,H,W,3)": (lambda: cuda(4, 512, 384, 3), (0, 1)),
    "uint8 (B,H,W,3)": (lambda: cuda(4, 256, 256, 3, dtype=torch.uint8), (0, 1)),
    "gray (B,1,H,W)": (lambda: cuda(4, 1, 256, 256), (0, 1)),
    "RGBA (B,H,W,4)": (lambda: cuda(4, 256, 256, 4), (0, 1)),
}


@pytest.mark.parametrize("name", list(RESTORE))
def test_restore_on_emulated_cuda(fake_cuda, name):
    make, value_range = RESTORE[name]
    x = make()
    traffic = HostTraffic()
    with traffic:
        prepared = inputs.prepare(x, value_range=value_range)
        index = [0, 2]
        out = prepared.restore(index, censor(prepared.select(index), "blur"))
    assert traffic.reads() == 0 and traffic.copies("d2h") == []
    # only host-side lists (the indices, per-channel weights) go to the device, never pixels
    assert all(n <= 4 for n in traffic.copies("h2d")), traffic.events
    assert out.device == CUDA and out.shape == x.shape and out.dtype == x.dtype
    assert prepared.pixels.device == CUDA and prepared.finite.device == CUDA


# --- the emulation itself catches what it must -------------------------------------------------

def test_the_emulation_catches_a_sync_and_a_device_mismatch(eva_dir, fake_cuda):
    det = emulated_detector(eva_dir)
    x = cuda(1, 3, 64, 64)
    hook = det.model.register_forward_pre_hook(lambda m, args: args[0].amax().item())
    with pytest.raises(DataDependentOutputException):
        det.predict(x)
    hook.remove()
    hook = det.model.register_forward_pre_hook(lambda m, args: (args[0] + torch.ones(3, 1, 1),))
    with pytest.raises(RuntimeError, match="same device|different devices"):  # torch >= 2.11 words it so
        det.predict(x)
    hook.remove()
    traffic = HostTraffic()
    with traffic:
        x.cpu()
    assert traffic.copies("d2h") == [x.numel()]
