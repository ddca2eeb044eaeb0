"""``python -m benchmarks.cascade``: what a second opinion costs; writes ``cascade-<device>.md/.json``.

A cascade runs its second model only on the images whose first score lies in a band. This measures
it at band widths 0.2 and 0.5, against the first model alone and against both models on every
image (an ensemble), on batches of decoded images ``(B, 3, 512, 512)`` in [-1, 1] on the device.

    python -m benchmarks.cascade --device cuda     # EVA02-B/448 -> ViT-B/16 at 384, ViT-B/16 at 224 -> EVA02-B/448
    python -m benchmarks.cascade --smoke           # tiny models on the CPU: checks the code, not the speed

Weights are random (no hub), so the first model's own scores mean nothing. Its forward pass runs
and is timed; then its level scores are replaced by a synthetic grid, evenly spaced over (0, 1)
and shuffled, so that a band of width w centred on 0.5 holds exactly w of the batch (the batch
size is chosen so: 80, or 20 for ``--smoke``). The second model's calls are counted to check it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from nsfw_safety import Cascade, Ensemble, load_detector

from .measure import sync
from .report import write

log = logging.getLogger("benchmarks.cascade")
ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (0.2, 0.5)

# name -> (description, writer keyword arguments); the full sizes are the real architectures'
FULL = {
    "eva": ("EVA02-B/14 at 448", "eva", dict(full=True)),
    "vit384": ("ViT-B/16 at 384 (vit-sd, vit)", "vit", dict(image_size=384, patch_size=16, hidden_size=768,
                                                              layers=12, heads=12, intermediate_size=3072, p_nsfw=0.5)),
    "vit224": ("ViT-B/16 at 224 (falconsai)", "vit", dict(image_size=224, patch_size=16, hidden_size=768,
                                                          layers=12, heads=12, intermediate_size=3072, p_nsfw=0.5)),
}
TINY = {"eva": ("tiny EVA02", "eva", {}), "vit384": ("tiny ViT", "vit", dict(p_nsfw=0.5)),
        "vit224": ("tiny ViT", "vit", dict(p_nsfw=0.5, seed=1))}
#: (first, second): the library's default first with a ViT second opinion, and a fast first model
#: with the expensive one second
PAIRS = (("eva", "vit384"), ("vit224", "eva"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cascade", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the .md and .json")
    p.add_argument("--smoke", action="store_true", help="tiny models, one repeat: checks the code, not the speed")
    p.add_argument("--batch", type=int, default=None, help="images per call (default 80; 20 for --smoke)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row (median); default 20, 1 for --smoke")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per row first (default 2)")
    p.add_argument("--pairs", type=_pairs, default=PAIRS,
                   help=f"first:second model pairs, comma-separated, from {', '.join(FULL)} "
                        f"(default {','.join(':'.join(p) for p in PAIRS)})")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def _pairs(raw: str) -> tuple[tuple[str, str], ...]:
    pairs = tuple(tuple(part.split(":")) for part in raw.split(",") if part)
    if not pairs or any(len(p) != 2 or not set(p) <= set(FULL) for p in pairs):
        raise argparse.ArgumentTypeError(f"expected first:second pairs of {', '.join(FULL)}, got {raw!r}")
    return pairs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns what was written to the JSON file."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    batch = args.batch or (20 if args.smoke else 80)
    repeats = args.repeats or (1 if args.smoke else 20)
    models = TINY if args.smoke else FULL
    size = 64 if args.smoke else 512
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads", "smoke": args.smoke, "batch": batch, "repeats": repeats,
            "warmup": args.warmup, "image_size": size, "load_average_start": list(os.getloadavg()),
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "models": {k: v[0] for k, v in models.items()}}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nsfw-safety-cascade-") as tmp:
        writers = _writers()
        dirs = {}
        for name in sorted({n for pair in args.pairs for n in pair}):
            description, kind, kwargs = models[name]
            log.info("writing a random %s checkpoint", description)
            dirs[name] = writers[kind](Path(tmp) / name, **kwargs)
        for first_name, second_name in args.pairs:
            rows += _pair(dirs, models, first_name, second_name, device, batch, size, repeats, args.warmup)
    meta["load_average_end"] = list(os.getloadavg())
    result = {"meta": meta, "rows": rows}
    stem = f"cascade-{args.device}" + ("-smoke" if args.smoke else "")
    write(args.out, stem, result, markdown(result))
    return result


@dataclasses.dataclass
class _Config:
    label: str
    width: float | None  # the band width, for a cascade
    run: Callable[[torch.Tensor], Any]
    second_images: int  # images the second model must see per call


def _pair(dirs, models, first_name, second_name, device, batch, size, repeats, warmup) -> list[dict[str, Any]]:
    first = load_detector(dirs[first_name], device=device, max_batch_size=batch)
    second = load_detector(dirs[second_name], device=device, max_batch_size=batch)
    dtype = first.dtype
    _synthetic_scores(first, batch)
    seen: list[int] = []
    second.model.register_forward_hook(lambda module, args, output: seen.append(len(args[0])))
    configs = [_Config("first model alone", None, lambda x: first.predict(x, value_range=(-1, 1)), 0),
               _Config("both models on every image", None,
                       lambda x: Ensemble([first, second], "any").predict(x, value_range=(-1, 1)), batch)]
    for w in WIDTHS:
        cascade = Cascade(first, second, band=(0.5 - w / 2, 0.5 + w / 2), combine="override")
        configs.append(_Config(f"cascade, band width {w}", w,
                               lambda x, c=cascade: c.predict(x, value_range=(-1, 1)), _in_band(batch, w)))

    def fresh() -> torch.Tensor:
        return torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1

    pair = f"{models[first_name][0]} -> {models[second_name][0]}"
    log.info("%s: warming up", pair)
    for c in configs:
        for _ in range(warmup):
            seen.clear()
            c.run(fresh())
            sync(device)
            if sum(seen) != c.second_images:  # the band holds what the grid says, and nothing more
                raise AssertionError(f"{c.label}: the second model saw {sum(seen)} images, expected {c.second_images}")
    times: dict[str, list[float]] = {c.label: [] for c in configs}
    for _ in range(repeats):  # the configurations take turns, call by call: the same load for each
        for c in configs:
            x = fresh()
            sync(device)
            t0 = time.perf_counter()
            c.run(x)
            sync(device)
            times[c.label].append(time.perf_counter() - t0)
    both = statistics.median(times["both models on every image"])
    alone = statistics.median(times["first model alone"])
    out = []
    for c in configs:
        t = statistics.median(times[c.label])
        out.append({"pair": pair, "config": c.label, "band_width": c.width, "batch": batch,
                    "second_images": c.second_images, "latency_ms": 1e3 * t, "images_per_s": batch / t,
                    "vs_both": t / both, "over_first_ms": 1e3 * (t - alone),
                    "latency_ms_all": [1e3 * v for v in times[c.label]]})
    del first, second
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _synthetic_scores(detector, batch: int) -> None:
    """After ``detector`` scores a batch for real, replace its level scores by an evenly spaced,
    shuffled grid over (0, 1) (neutral = 1 - p, low = medium = high = p): made once on the device,
    so the replacement costs no copy."""
    g = torch.Generator().manual_seed(0)
    p = ((torch.arange(batch) + 0.5) / batch)[torch.randperm(batch, generator=g)]
    grid = torch.stack([1 - p, p, p, p], dim=1).to(detector.device)
    real = detector.score

    def score(pixels, finite=None):
        s = real(pixels, finite)
        return dataclasses.replace(s, levels=grid[: len(s)])

    detector.score = score


def _in_band(batch: int, width: float) -> int:
    """How many grid scores (i + 0.5) / batch lie in [0.5 - width/2, 0.5 + width/2]."""
    lo, hi = 0.5 - width / 2, 0.5 + width / 2
    return sum(lo <= (i + 0.5) / batch <= hi for i in range(batch))


def _writers() -> dict[str, Callable[..., Path]]:
    """tests/checkpoints.py's writers of the real on-disk formats (shared with the test fixtures)."""
    spec = importlib.util.spec_from_file_location("_nsfw_safety_checkpoints", ROOT / "tests" / "checkpoints.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"eva": module.write_eva, "vit": module.write_vit}


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [f"Second opinion cost on {m['device_name']} ({m['device']}), torch {m['torch']}, batch {m['batch']} "
             f"of {m['image_size']}x{m['image_size']} decoded images, median of {m['repeats']}"
             f"{' (smoke: tiny models)' if m['smoke'] else ''}; random weights, synthetic first scores.", "",
             "| first -> second | run | second model sees | ms per batch | images/s | vs both on all |",
             "|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['pair']} | {r['config']} | {r['second_images']} of {r['batch']} | "
                     f"{r['latency_ms']:.1f} | {r['images_per_s']:.0f} | {r['vs_both']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
