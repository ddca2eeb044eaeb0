"""``python -m benchmarks.video``: frames per second of the video check, and decoding cost.

    python -m benchmarks.video --model tiny --frames 64            # the check's own overhead
    python -m benchmarks.video --model full --frames 8             # the real EVA02-B/448
    python -m benchmarks.video --device cuda --model full --frames 256

Rows (medians of ``--repeats`` runs after one warm-up):

* ``check_video`` on frames already in memory, ``(F, 3, S, S)`` float on the device: the scoring
  path alone, in batches of ``--batch``.
* ``check_video`` on an H.264 MP4 file of ``F`` frames at S x S: decoding plus scoring.
* decoding alone, ms per frame: PyAV to RGB (what the check does), PyAV without the RGB
  conversion, and torchcodec to RGB on the CPU and on CUDA where it is installed and loads
  (``frames.read_frames(..., decoder="torchcodec", device=...)``); to give it PyAV's FFmpeg, run
  with ``LD_LIBRARY_PATH=$(python -c "from nsfw_safety.frames import link_pyav_ffmpeg as f; print(f('.ffmpeg'))")``.

Weights are random (throughput does not depend on them); the machine's load average is printed
with the results, since a shared machine's numbers move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nsfw_safety import SafetyFilter, load_detector
from nsfw_safety.frames import read_frames
from nsfw_safety.video import check_video

from .measure import sync
from .run import _write_eva


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.video", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("tiny", "full"), default="tiny", help="tiny test EVA, or the real EVA02-B/448")
    p.add_argument("--frames", type=int, default=32, help="frames per video")
    p.add_argument("--size", type=int, default=512, help="frame side, pixels")
    p.add_argument("--batch", type=int, default=32, help="the detector's max_batch_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-frames", type=int, default=120, help="frames of the decoding benchmark's video")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def timed(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_mp4(path: Path, frames: int, size: int) -> Path:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):  # a moving texture: every frame differs, as in a real clip
            image = np.roll(base, 4 * i, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def decode_ms(path: Path, frames: int, repeats: int, **options) -> float:
    def run():
        n = sum(1 for _ in read_frames(path, **options))
        assert n == frames, n
    return timed(run, torch.device("cpu"), repeats) / frames * 1000


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows: dict[str, float | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = _write_eva()(tmp / "eva", full=args.model == "full")
        guard = SafetyFilter(load_detector(str(checkpoint), device=device, max_batch_size=args.batch))
        frames = torch.rand(args.frames, 3, args.size, args.size, device=device)
        seconds = timed(lambda: check_video(frames, guard), device, args.repeats)
        rows["check_video, frames in memory: frames/s"] = args.frames / seconds
        clip = write_mp4(tmp / "clip.mp4", args.frames, args.size)
        seconds = timed(lambda: check_video(clip, guard), device, args.repeats)
        rows["check_video, MP4 file (decode + score): frames/s"] = args.frames / seconds
        video = write_mp4(tmp / "decode.mp4", args.decode_frames, args.size)
        rows["PyAV decode to RGB: ms/frame"] = decode_ms(video, args.decode_frames, args.repeats)
        rows["PyAV decode, no RGB conversion: ms/frame"] = decode_ms(
            video, args.decode_frames, args.repeats, select=lambda index, time: False)
        for where in ("cpu", "cuda"):
            key = f"torchcodec decode on {where}: ms/frame"
            if where == "cuda" and not torch.cuda.is_available():
                continue
            try:
                rows[key] = decode_ms(video, args.decode_frames, args.repeats, decoder="torchcodec", device=where)
            except ImportError as e:
                rows[key] = f"not run: {e}"
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "model": args.model, "frames": args.frames, "size": args.size,
              "batch": args.batch, "load_average": os.getloadavg(), "rows": rows}
    print(f"# video check on {result['device']} ({result['threads']} threads), {args.model} EVA, "
          f"{args.frames} frames at {args.size}x{args.size}, load average {result['load_average'][0]:.1f}")
    for key, value in rows.items():
        print(f"| {key} | {value:.2f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
