"""``python -m benchmarks.regions``: what region mode costs per image, next to the classifier.

    python -m benchmarks.regions --device cpu      # writes results/regions-cpu.md and .json
    python -m benchmarks.regions --device cuda     # the region detector on onnxruntime's CUDA provider
    python -m benchmarks.regions --smoke           # tiny classifier, 64 px, 2 repeats: checks the code

Every row is per image, at each batch size, on fresh random 512 x 512 RGB images (uint8, as
decoded files are, or float in [0, 1]): the median of the repeats, as wall-clock milliseconds
and as the process's CPU milliseconds (every thread's, torch's and onnxruntime's), which a shared
machine's load disturbs far less than the wall clock. The classifier is the real EVA02-B/448
architecture with random weights (fp32 on the CPU, bf16 on CUDA).

The filter rows start from given scores (``SafetyFilter(..., scores=...)``, every image flagged),
so they time what region mode adds after the classifier: the whole-image blur alone, against the
region detector plus the mask plus the blur inside it. Random images hold no region, so the
region rows time a hand-placed feathered ellipse per image, and region mode's filter row ends
in the whole-image blur (a flagged image with no region is censored whole).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety.regions import NUDENET_LABELS, RegionDetector, Regions, RegionSettings, censor_regions, region_mask

from .measure import median, sync
from .report import write
from .run import ROOT, _cpu_name, _write_eva

log = logging.getLogger("benchmarks.regions")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.regions", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the .md and .json")
    p.add_argument("--smoke", action="store_true", help="tiny classifier, small images, 2 repeats")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="default 1,8 (1,2 for --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (median); default 7, 2 for --smoke")
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def times(fn: Callable[[Any], Any], make: Callable[[], Any], device: torch.device, repeats: int) -> tuple[list, list]:
    """(wall seconds, process CPU seconds) of ``fn(make())``, ``repeats`` times after one warm-up call;
    inputs are made outside the timed region, which ends with a synchronize."""
    fn(make())
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        x = make()
        sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        fn(x)
        sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def one_box(n: int, size: int, device: torch.device) -> Regions:
    """One hand-placed region per image: a quarter of the image, off-centre."""
    box = torch.tensor([[size * 0.3, size * 0.2, size * 0.8, size * 0.7]], device=device)
    return Regions(box.repeat(n, 1), torch.full((n,), 0.9, device=device),
                   torch.full((n,), NUDENET_LABELS.index("BUTTOCKS_EXPOSED"), device=device),
                   torch.arange(n, device=device), (size, size), (None,) * n)


def rows(args: argparse.Namespace, checkpoint: Path) -> list[dict[str, Any]]:
    device = torch.device(args.device)
    batches = args.batch_sizes or ([1, 2] if args.smoke else [1, 8])
    repeats = args.repeats or (2 if args.smoke else 7)
    size = 64 if args.smoke else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    classifier = load_detector(str(checkpoint), device=device, dtype=dtype, max_batch_size=max(batches))
    regions = RegionSettings(RegionDetector(device=device, threads=args.threads))
    detector = regions.detector
    flag_all = {"low": 0.0}  # every image flagged: the censor path always runs

    def uint8(b):
        return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, device=device)

    def unit(b):
        return torch.rand(b, 3, size, size, device=device)

    scored: dict[int, Any] = {}

    def with_scores(b):  # fresh images; the scores of the first ones (the rule flags every image anyway)
        x = uint8(b)
        if b not in scored:
            scored[b] = classifier.score(x)
        return x, scored[b]

    whole = SafetyFilter(classifier, thresholds=flag_all, action="blur")
    regional = SafetyFilter(classifier, thresholds=flag_all, action="blur", regions=regions)
    measured = [
        ("classifier", f"classifier: {'tiny EVA02' if args.smoke else 'EVA02-B/448'} ({str(dtype)[6:]}), "
                       "Detector.score", uint8, lambda x: classifier.score(x).levels),
        ("detector_uint8", "region detector, uint8 input: letterbox + onnxruntime + NMS", uint8, detector),
        ("detector_float", "region detector, float input", unit, detector),
        ("letterbox_uint8", "of which the letterbox, uint8 input", uint8, detector.preprocess),
        ("mask", "region_mask, one feathered ellipse", lambda b: one_box(b, size, device),
         lambda r: region_mask(r, shape="ellipse", feather=0.05)),
        ("censor", "censor_regions, blur inside that mask", lambda b: (unit(b), one_box(b, size, device)),
         lambda xr: censor_regions(xr[0], region_mask(xr[1], shape="ellipse", feather=0.05), "blur")),
        ("filter_whole", "SafetyFilter after scoring, region mode off: whole-image blur", with_scores,
         lambda xs: whole(xs[0], scores=xs[1])),
        ("filter_regions", "SafetyFilter after scoring, region mode: detector, then the blur", with_scores,
         lambda xs: regional(xs[0], scores=xs[1])),
    ]
    out = []
    for b in batches:
        for key, label, make, fn in measured:
            log.info("%s, batch %d", label, b)
            wall, cpu = times(fn, lambda: make(b), device, repeats)
            out.append({"key": key, "label": label, "batch": b, "wall_ms_per_image": 1e3 * median(wall) / b,
                        "cpu_ms_per_image": 1e3 * median(cpu) / b, "wall_ms_all": [1e3 * t for t in wall],
                        "cpu_ms_all": [1e3 * t for t in cpu]})
    return out


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    batches = meta["batch_sizes"]
    threads = f"{meta['threads']} thread" + ("s" if meta["threads"] != 1 else "")
    lines = [f"# Region mode's cost per image: {meta['device_name']}", "",
             f"{meta['date']} · torch {meta['torch']} · onnxruntime {meta['onnxruntime']} ({meta['provider']}) · "
             f"{threads} · load average {meta['load_average_start'][0]:.1f} at start, "
             f"{meta['load_average_end'][0]:.1f} at end", "",
             f"Random {meta['image_size']} x {meta['image_size']} images; median of {meta['repeats']} calls after a "
             "warm-up; milliseconds per image, wall clock and process CPU time (all threads).", "",
             "| step | " + " | ".join(f"batch {b}: wall | batch {b}: CPU" for b in batches) + " |",
             "|---|" + "---:|---:|" * len(batches)]
    by_key: dict[str, dict[int, dict]] = {}
    for r in result["rows"]:
        by_key.setdefault(r["key"], {})[r["batch"]] = r
    for key, per_batch in by_key.items():
        label = next(iter(per_batch.values()))["label"]
        cells = [f"{per_batch[b]['wall_ms_per_image']:,.1f} | {per_batch[b]['cpu_ms_per_image']:,.1f}" for b in batches]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime as ort

    device = torch.device(args.device)
    meta = {"device": args.device, "smoke": args.smoke, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "provider": "CUDA" if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
            else "CPU", "threads": args.threads or torch.get_num_threads(),
            "batch_sizes": args.batch_sizes or ([1, 2] if args.smoke else [1, 8]),
            "repeats": args.repeats or (2 if args.smoke else 7), "image_size": 64 if args.smoke else 512,
            "load_average_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory(prefix="nsfw-safety-bench-") as tmp:
        checkpoint = Path(tmp) / "eva"
        _write_eva()(checkpoint, full=not args.smoke)
        result = {"meta": meta, "rows": rows(args, checkpoint)}
    meta["load_average_end"] = list(os.getloadavg())
    meta["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stem = f"regions-{args.device}" + ("-smoke" if args.smoke else "")
    write(args.out, stem, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
