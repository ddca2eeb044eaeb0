"""``python -m benchmarks.ray_scan``: images/s of the Ray scan (1 and 2 CPU actors) against the
local ``scan``, on the same folder of PNGs, to state Ray's overhead on one machine.

    python -m benchmarks.ray_scan                      # 64 PNGs 512², the tiny EVA (overhead shows)
    python -m benchmarks.ray_scan --model full --images 32

Each Ray row is one ``scan_to_parquet`` into a fresh folder, timed from the call to the last
row written (the model loads inside the actors, so their load is in it); Ray's own start-up is
timed apart. The local row is ``nsfw_safety.scan.run.scan`` with its model load subtracted and
also shown. Weights are random (throughput does not depend on them); the load average is printed,
since a shared machine's numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .run import _write_eva


def _folder(root: Path, n: int, size: int) -> Path:
    src = root / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(src / f"{i:04d}.png")
    return src


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ray_scan", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--model", choices=("tiny", "full"), default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--actors", default="1,2", help="comma-separated CPU actor counts")
    args = p.parse_args(argv)

    import ray

    from nsfw_safety import ray as nray
    from nsfw_safety.levels import Policy
    from nsfw_safety.scan.run import ScanOptions, scan

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src = _folder(root, args.images, args.size)
        model = str(_write_eva()(root / "model", full=args.model == "full"))
        opts = ScanOptions(paths=[str(src)], model=model, device="cpu", batch_size=args.batch,
                           workers=min(8, os.cpu_count() or 1), policy=Policy())
        s = scan(opts)
        t = s["seconds"] - s["model_load_seconds"]
        rows.append({"engine": "local scan", "seconds": round(t, 2), "images_per_second": round(args.images / t, 2),
                     "model_load_seconds": s["model_load_seconds"]})
        print(rows[-1], flush=True)

        t0 = time.monotonic()
        ray.init(include_dashboard=False, log_to_driver=False)
        startup = time.monotonic() - t0
        ray.data.DataContext.get_current().enable_progress_bars = False
        # actors that take every CPU leave none to the read and decode tasks: the job hangs
        cpus = ray.cluster_resources()["CPU"]
        try:
            for actors in (int(a) for a in args.actors.split(",")):
                t0 = time.monotonic()
                out = nray.scan_to_parquet(nray.read_images(str(src)), root / f"out{actors}", model=model,
                                           device="cpu", batch_size=args.batch, actors=actors,
                                           num_cpus=min(1.0, cpus / (actors + 1)))
                t = time.monotonic() - t0
                assert out["scored"] == args.images, out
                rows.append({"engine": f"ray, {actors} CPU actor{'s' * (actors > 1)}", "seconds": round(t, 2),
                             "images_per_second": round(args.images / t, 2), "model_load_seconds": None})
                print(rows[-1], flush=True)
        finally:
            ray.shutdown()
    result = {"images": args.images, "size": args.size, "model": args.model, "batch": args.batch,
              "cpus": os.cpu_count(), "load_average": os.getloadavg(), "ray_init_seconds": round(startup, 1),
              "rows": rows}
    print(f"{args.images} PNGs {args.size}², model {args.model}, batch {args.batch}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; ray.init {startup:.1f} s (not counted)")
    print("| engine | s | images/s |\n|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['seconds']} | {r['images_per_second']} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
