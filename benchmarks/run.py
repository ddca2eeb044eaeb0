"""``python -m benchmarks``: measure every path in one process; write ``<device>.md`` and ``<device>.json``.

    python -m benchmarks --device cuda                 # the GPU table (batch 1, 4, 16, 64)
    python -m benchmarks --device cuda --quick         # every path in ~5 minutes (benchmarks/gpu.sh)
    python -m benchmarks --device cpu                  # the CPU table (batch 1, 4)
    python -m benchmarks --smoke                       # tiny models, < 60 s on 2 CPU cores (CI)

Weights are random (the hub is not needed): the real EVA02-B/448 TimmWrapper checkpoint is
written to a temporary directory and deleted afterwards. The files are rewritten after each
section (and each batch size), so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import platform
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from nsfw_safety import detector as D
from nsfw_safety.detector import NATIVE_BF16_FLAGS, cpu_bf16_native, resolve_dtype

from . import paths as P
from .measure import count_flops, matmul_peak_tflops, median, peak_memory_mib, time_calls
from .report import markdown, summary

log = logging.getLogger("benchmarks")
ROOT = Path(__file__).resolve().parents[1]


def _write_eva():
    """tests/checkpoints.py's writer of the real TimmWrapper format (shared with the test fixtures)."""
    spec = importlib.util.spec_from_file_location("_nsfw_safety_checkpoints", ROOT / "tests" / "checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_eva


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the .md and .json")
    p.add_argument("--smoke", action="store_true", help="tiny models, few repeats: checks the code, not the speed")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats (10 CUDA, 3 CPU), one compile per mode (compile at the largest batch, "
                        "CUDA graphs at the smallest), 3 pipeline runs: a GPU run in ~5 minutes")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="default 1,4,16,64 on CUDA, 1,4 on the CPU, 1,2 for --smoke")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed calls per row (median); default 20 CUDA, 5 CPU (--quick: 10, 3)")
    p.add_argument("--cpu-bf16-batches", type=lambda s: [int(v) for v in s.split(",") if v], default=None,
                   help="batch sizes of the bf16 rows on the CPU (default: batch 1 only; bf16 is slow there)")
    p.add_argument("--sd-steps", type=int, default=None, help="denoising steps (default 30 CUDA, 10 CPU, 2 smoke)")
    p.add_argument("--skip-sd", action="store_true", help="skip the Stable Diffusion pipeline section")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what was written to the JSON file."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    smoke = args.smoke
    batches = args.batch_sizes or ([1, 2] if smoke else [1, 4, 16, 64] if cuda else [1, 4])
    repeats = args.repeats or (2 if smoke else (10 if args.quick else 20) if cuda else (3 if args.quick else 5))
    size = 64 if smoke else 512  # decoded image side
    meta = _meta(device, smoke, batches, repeats)
    meta.update(image_size=size, quick=args.quick)
    result: dict[str, Any] = {"meta": meta, "rows": [], "preprocessing": [], "parity": None,
                              "arithmetic": None, "sd_pipeline": None}
    stem = f"{args.device}-smoke" if smoke else args.device
    args.out.mkdir(parents=True, exist_ok=True)

    def write() -> None:
        meta["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        meta["load_average_end"] = list(os.getloadavg())
        _add_rates(result)
        (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / f"{stem}.md").write_text(markdown(result))

    with tempfile.TemporaryDirectory(prefix="nsfw-safety-bench-") as tmp:
        checkpoint = Path(tmp) / "eva"
        log.info("writing a random %s EVA02 checkpoint to %s", "tiny" if smoke else "full B/448", checkpoint)
        # the tiny one at 448 too: Freepik's package always feeds its model 448x448
        _write_eva()(checkpoint, full=not smoke, img_size=448)
        result["arithmetic"] = _arithmetic(checkpoint, device, smoke)
        built = list(_paths(checkpoint, device, smoke, batches, size, args))

        def batch_done(rows):
            result["rows"] = rows
            write()

        # in the order of what a cut-short run most needs: the rows, then the pipeline share
        result["rows"] = _measure(built, batches, device, repeats, batch_done)
        del built
        result["parity"] = _parity(checkpoint, device, size)
        write()
        if not args.skip_sd:
            steps = args.sd_steps or (2 if smoke else 30 if cuda else 10)
            log.info("Stable Diffusion pipeline, %d steps", steps)
            result["sd_pipeline"] = _sd(checkpoint, device, smoke, cuda, steps, 3 if args.quick else repeats)
            write()
        result["preprocessing"] = _preprocessing(checkpoint, device, batches, size, repeats)
    write()
    print(markdown(result))
    print(summary(result))
    return result


def _meta(device: torch.device, smoke: bool, batches: list[int], repeats: int) -> dict[str, Any]:
    import diffusers
    import timm
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": str(device), "device_name": name, "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "smoke": smoke, "batch_sizes": batches, "repeats": repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "transformers": transformers.__version__, "diffusers": diffusers.__version__,
        "nsfw_image_detector": _package_version("nsfw-image-detector"),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cpu_bf16": _cpu_bf16(),
        "default_dtype": P._name(resolve_dtype("auto", device)),
        "load_average_start": list(os.getloadavg()),
        "model": "EVA02-B/14 at 448 (eva02_base_patch14_448, TimmWrapper format), random weights"
                 if not smoke else "tiny EVA02 (tests/checkpoints.py), random weights",
    }


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cpu_bf16() -> dict[str, Any]:
    """What decides ``dtype="auto"`` on this CPU: the native-bf16 flags it has, and the verdict."""
    caps = D._cpu_capabilities()
    return {"native": cpu_bf16_native(), "flags": [f for f in (*NATIVE_BF16_FLAGS, "avx512_f", "avx2") if caps.get(f)]}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _paths(checkpoint, device, smoke, batches, size, args):
    """(path, batch sizes) in table order; a path that cannot be built becomes an error row.

    Each EVA path runs on its defaults (this library: ``dtype="auto"``; Freepik's package: bf16)
    and in the other dtype. On a CPU without native bf16, bf16 rows run at the first batch size
    only (bf16 is emulated there, several times slower).
    """
    cuda = device.type == "cuda"
    big = max(batches)
    bf16, fp32 = torch.bfloat16, torch.float32
    default = resolve_dtype("auto", device)
    slow_bf16 = not cuda and not cpu_bf16_native()
    bf16_batches = (args.cpu_bf16_batches or batches[:1]) if slow_bf16 else batches
    at = {bf16: bf16_batches, fp32: batches}
    # torch.compile compiles once per batch size; --quick compiles each mode once: plain compile at
    # the largest batch (the throughput target), CUDA graphs at the smallest (launch-bound)
    compile_at = [big] if args.quick else batches
    graphs_at = [min(batches)] if args.quick else batches

    def lib(dtype, key="a_eager", kind="eager", compile=False):
        return lambda: P.lib_path(key, f"({key[0]}) nsfw-safety tensors, {P._name(dtype)} {kind}", checkpoint,
                                  device, dtype, size, big, compile=compile)

    def freepik(dtype):
        return lambda: P.freepik_path(checkpoint, device, dtype, size)

    specs = [(lib(default), at[default])]
    if cuda and not smoke:
        specs.append((lib(bf16, "b_compile", "compile", True), compile_at))
        specs.append((lib(bf16, "b_cudagraphs", "compile + CUDA graphs", "reduce-overhead"), graphs_at))
    specs.append((freepik(None), at[bf16]))  # its default: bf16 on every device
    if not cuda:  # this library in the other dtype (on CUDA bf16 is everyone's choice)
        other = fp32 if default == bf16 else bf16
        specs.append((lib(other), at[other]))
    specs.append((freepik(fp32), batches))
    side = default if cuda else fp32  # (d) and (e) in their own defaults: fp32 on the CPU
    specs.append((lambda: P.hf_pipeline_path(checkpoint, device, side, size), batches))
    specs.append((lambda: P.clip_checker_path(device, side, size, tiny=smoke), batches))
    for build, path_batches in specs:
        try:
            yield build(), path_batches
        except Exception as e:  # noqa: BLE001 - one broken path must not lose the others' numbers
            log.exception("could not build a path")
            yield _Broken(f"{type(e).__name__}: {e}"), path_batches


class _Broken:
    key, label, dtype = "error", "(path failed to build)", None

    def __init__(self, error: str):
        self.error = error


def _measure(built, batches, device, repeats, batch_done=None) -> list[dict[str, Any]]:
    """One row per (path, batch size), in table order; ``batch_done(rows so far)`` after each batch size.

    At each batch size the paths take turns, one timed call each per round, so that on a shared
    machine a change of load hits every path alike instead of whichever ran at that moment.
    """
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    warmed: set[int] = set()
    for b in sorted(batches, reverse=True):  # the largest first: the targets are set there
        active = []
        for n, (path, path_batches) in enumerate(built):
            if b not in path_batches:
                continue
            if isinstance(path, _Broken):
                rows[n, b] = {"key": path.key, "label": path.label, "batch": b, "error": path.error}
                continue
            rows[n, b] = row = {"key": path.key, "label": path.label, "dtype": P._name(path.dtype), "batch": b,
                                "default": path.default, "latency_ms_all": []}
            log.info("warming up %s, batch %d", path.label, b)
            # compiled paths compile per batch size, CUDA sets up kernels per shape; CPU eager needs one call
            warmup = 3 if device.type == "cuda" or path.key.startswith("b_") else (0 if n in warmed else 1)
            warmed.add(n)
            if _attempt(row, _warm, path, b, device, warmup):
                active.append((path, row))
        log.info("batch %d: %d rounds over %d paths", b, repeats, len(active))
        for _ in range(repeats):
            for path, row in active:
                if "error" not in row:
                    _attempt(row, _timed_call, path, b, device)
        for path, row in active:
            if "error" not in row:
                latency = median(row["latency_ms_all"])
                row.update(latency_ms=latency, images_per_s=1e3 * b / latency)
                _attempt(row, _memory, path, b, device)
        if batch_done is not None:
            batch_done([rows[k] for k in sorted(rows)])
    return [rows[k] for k in sorted(rows)]


def _warm(row, path, b, device, warmup) -> None:
    if path.key.startswith("b_"):  # the first call at a new batch size compiles: report it apart
        row["first_call_s"] = time_calls(path.run, lambda: path.make_input(b), device, warmup=0, repeats=1)[0]
    time_calls(path.run, lambda: path.make_input(b), device, warmup=warmup, repeats=0)


def _timed_call(row, path, b, device) -> None:
    row["latency_ms_all"] += [1e3 * t for t in time_calls(path.run, lambda: path.make_input(b), device,
                                                          warmup=0, repeats=1)]


def _memory(row, path, b, device) -> None:
    row["peak_mem_mib"] = peak_memory_mib(path.run, lambda: path.make_input(b), device, path.module)


def _attempt(row, step, *args) -> bool:
    """``step(row, *args)``; on failure record the error in ``row`` (the other rows go on)."""
    try:
        step(row, *args)
        return True
    except Exception as e:  # noqa: BLE001 - e.g. CUDA graphs refusing: record it, measure the rest
        log.exception("%s failed at batch %d", row["label"], row["batch"])
        row["error"] = f"{type(e).__name__}: {e}"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return False


def _arithmetic(checkpoint, device, smoke) -> dict[str, Any]:
    """FLOPs per image of the EVA model, and the measured matmul ceiling of this device."""
    from nsfw_safety import load_detector

    det = load_detector(str(checkpoint), device=device, dtype=resolve_dtype("auto", device))
    h, w = det.preprocess_config.size
    flops = count_flops(det.model, torch.randn(1, 3, h, w, device=device, dtype=det.dtype))
    if device.type == "cuda":
        sizes = {torch.bfloat16: (8192, 20), torch.float32: (8192, 3)}
    elif smoke:
        sizes = {torch.float32: (256, 4), torch.bfloat16: (256, 4)}
    else:
        sizes = {torch.float32: (2048, 2), torch.bfloat16: (2048, 1)}  # oneDNN's bf16 needs large GEMMs
    peaks = {}
    for dtype, (n, iters) in sizes.items():
        log.info("matmul ceiling, %s, n=%d", dtype, n)
        peaks[P._name(dtype)] = matmul_peak_tflops(device, dtype, n, iters=iters, repeats=3 if smoke else 5)
    return {"model_input": [3, h, w], "gflop_per_image": flops / 1e9, "matmul_peak_tflops": peaks,
            "matmul_sizes": {P._name(d): n for d, (n, _) in sizes.items()}}


def _add_rates(result) -> None:
    """Achieved TFLOP/s of the EVA paths, and their fraction of the matmul ceiling of their dtype."""
    arith = result["arithmetic"]
    for row in result["rows"]:
        if "error" in row or row["key"][0] not in "abc":
            continue
        tflops = arith["gflop_per_image"] * row["images_per_s"] / 1e3
        row["tflops"] = tflops
        peak = arith["matmul_peak_tflops"].get(row["dtype"])
        row["peak_fraction"] = tflops / peak if peak else None


def _preprocessing(checkpoint, device, batches, size, repeats) -> list[dict[str, Any]]:
    """Where (a) and (c) spend their non-model time: tensors -> model input vs PIL -> model input
    (Freepik's own ``_prepare_inputs``: its timm transform per image, stack, to the device)."""
    from nsfw_safety import inputs, load_detector
    from nsfw_safety.preprocess import preprocess

    dtype = resolve_dtype("auto", device)
    det = load_detector(str(checkpoint), device=device, dtype=dtype)
    freepik = P.freepik_detector(checkpoint, device, None)

    def lib(x):
        prepared = inputs.prepare(x, value_range=(-1.0, 1.0), device=device)
        return preprocess(prepared.pixels, det.preprocess_config, dtype)

    rows = []
    for b in batches:
        decoded, pils = (lambda: P.decoded(b, size, device, dtype)), (lambda: P.pil_images(b, size))  # noqa: B023
        lib(decoded())  # warm-up
        freepik._prepare_inputs(pils())
        t_lib, t_ref = [], []
        for _ in range(repeats):  # taking turns
            t_lib += time_calls(lib, decoded, device, warmup=0, repeats=1)
            t_ref += time_calls(freepik._prepare_inputs, pils, device, warmup=0, repeats=1)
        rows.append({"batch": b, "dtype": P._name(dtype), "lib_ms": 1e3 * median(t_lib),
                     "reference_ms": 1e3 * median(t_ref)})
    return rows


def _parity(checkpoint, device, size) -> dict[str, Any]:
    """(a) and (c) must compute the same function: the same images through both, in fp32."""
    from nsfw_safety import load_detector

    x = P.decoded(2, size, device, torch.float32)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # what both paths can see
    images = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy(), "RGB") for im in u8]
    try:
        ref = P.freepik_levels(P.freepik_detector(checkpoint, device, torch.float32).predict_proba(images))
    except Exception as e:  # noqa: BLE001 - the package missing: the rows say so too
        return {"error": f"{type(e).__name__}: {e}"}
    lib = load_detector(str(checkpoint), device=device, dtype=torch.float32).predict(u8).levels.cpu()
    return {"max_abs_level_diff": float((lib - ref).abs().max()), "images": 2, "dtype": "fp32"}


def _sd(checkpoint, device, smoke, cuda, steps, repeats) -> dict[str, Any]:
    from .sd import run_share

    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda and not smoke:
        return run_share(checkpoint, device, dtype, tiny=False, batch=4, steps=steps, size=512,
                         repeats=min(repeats, 5), clip_tiny=False)
    return run_share(checkpoint, device, dtype, tiny=True, batch=1, steps=steps, size=64 if smoke else 512,
                     repeats=1 if smoke else min(repeats, 2), clip_tiny=smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
