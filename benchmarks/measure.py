"""Timing, memory, FLOP counting and the matmul ceiling, on CPU or CUDA."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def sync(device: torch.device) -> None:
    """Wait for the device: host clocks read after this see all queued work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Any], Any], make_input: Callable[[], Any], device: torch.device, *,
               warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn(make_input())``, ``repeats`` times after ``warmup`` untimed calls.

    Every call gets a fresh input, made (and synchronized) outside the timed region; the timed
    region ends with a synchronize, so queued device work is counted.
    """
    for _ in range(warmup):
        fn(make_input())
        sync(device)
    times = []
    for _ in range(repeats):
        x = make_input()
        sync(device)
        t0 = time.perf_counter()
        fn(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def peak_memory_mib(fn: Callable[[Any], Any], make_input: Callable[[], Any], device: torch.device,
                    module: torch.nn.Module | None) -> float | None:
    """Peak device memory of one call, in MiB: the path's weights plus what the call allocates on top
    of what was allocated before it (the caller's input and other paths' models are not counted).
    None on the CPU.

    The CPU has no per-call peak to read (glibc keeps freed pages, RSS only grows), so none is
    made up; the process's peak RSS is reported once in the run's metadata instead.
    """
    if device.type != "cuda":
        return None
    weights = sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())) if module else 0
    x = make_input()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(x)
    sync(device)
    return (weights + torch.cuda.max_memory_allocated(device) - before) / 2**20


def median(values: list[float]) -> float:
    return statistics.median(values)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass of ``model`` on ``x`` (matmuls, convolutions, attention).

    Attention runs on the math backend, whose matmuls every torch counts; the fused kernels'
    counts differ between torch versions (none on the CPU in 2.3). no_grad, not inference_mode:
    torch 2.3's counter sees nothing in inference mode.
    """
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x)
    return counter.get_total_flops()


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, n: int, *, iters: int, repeats: int = 5) -> float:
    """Measured matmul rate (TFLOP/s): the median of ``repeats`` timed loops of ``iters`` (n, n) @ (n, n)
    products on random operands, after a warm-up loop.

    The products go through ``F.linear``, the kernel of the model's own layers: on a CPU without
    native bf16, ``torch.mm`` in bf16 takes a path about 20x slower than oneDNN's.
    """
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def loop(_):
        for _ in range(iters):
            torch.nn.functional.linear(a, b)

    times = time_calls(loop, lambda: None, device, warmup=1, repeats=repeats)
    return 2 * n**3 * iters / median(times) / 1e12
