"""The Markdown table of a benchmark run (the JSON holds every number)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    meta, arith = result["meta"], result["arithmetic"]
    bf16 = meta["cpu_bf16"]
    cpu_bf16 = (f"native bf16 ({', '.join(f for f in bf16['flags'] if 'bf16' in f)})" if bf16["native"] else
                f"no native bf16 ({', '.join(bf16['flags']) or 'no flags read'}; no avx512_bf16 or amx_bf16)")
    lines = [
        f"# nsfw-safety benchmark: {meta['device_name']}{' (smoke run: tiny models)' if meta['smoke'] else ''}"
        + (" (--quick)" if meta.get("quick") else ""),
        "",
        f"{meta['date']} · torch {meta['torch']} · timm {meta['timm']} · transformers {meta['transformers']} · "
        f"diffusers {meta['diffusers']} · nsfw-image-detector {meta['nsfw_image_detector'] or 'not installed'}"
        + (f" · CUDA {meta['cuda']}" if meta["cuda"] else "")
        + f" · {meta['cpu_threads']} CPU threads · load average {meta['load_average_start'][0]:.1f} at start",
        "",
        f"CPU: {cpu_bf16}, so `dtype=\"auto\"` is {meta['default_dtype']} on {meta['device']}. "
        f"Model: {meta['model']}. Input: decoded {meta['image_size']}x{meta['image_size']} images "
        f"(tensors in [-1, 1], or PIL for (c), (d)). "
        f"Median of {meta['repeats']} timed calls after warm-up (the paths take turns, call by call), "
        f"fresh random images every call. \"(default)\": the path as its users get it.",
        "",
        "| path | batch | latency (ms) | images/s | peak memory (MiB) | TFLOP/s | of matmul peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['batch']} | failed: {r['error'][:80]} | | | | |")
            continue
        frac = r.get("peak_fraction")
        lines.append(
            f"| {r['label']} | {r['batch']} | {_f(r['latency_ms'])} | {_f(r['images_per_s'], 2)} | "
            f"{_f(r['peak_mem_mib'], 0)} | {_f(r.get('tflops'), 3)} | {'' if frac is None else f'{100 * frac:.0f}%'} |")
    peaks = ", ".join(f"{k} {v:,.3f} TFLOP/s (n={arith['matmul_sizes'][k]})"
                      for k, v in arith["matmul_peak_tflops"].items())
    lines += [
        "",
        f"Arithmetic: {arith['gflop_per_image']:.1f} GFLOP per image (FlopCounterMode, input "
        f"{'x'.join(map(str, arith['model_input']))}); measured matmul ceiling: {peaks}.",
    ]
    if meta["device"] == "cuda":
        lines.append("Peak memory: the path's weights plus the most one call allocates on top of what was already "
                     "allocated (torch.cuda.max_memory_allocated); the caller's input is not counted.")
    if meta["device"] == "cpu":
        lines.append(f"Peak memory per row is not measured on the CPU (n/a); the process's peak RSS was "
                     f"{meta.get('peak_rss_mib', 0):,.0f} MiB.")
    parity = result["parity"]
    if parity and "error" in parity:
        lines.append(f"Parity: not measured ({parity['error'][:80]}).")
    elif parity:
        lines.append(f"Parity: (a) and (c) on the same {parity['images']} images differ by at most "
                     f"{parity['max_abs_level_diff']:.2e} in level score (fp32).")
    if result["preprocessing"]:
        lines += ["", "Preprocessing alone (decoded image to model input):", "",
                  f"| batch | (a) tensors, on the device, {result['preprocessing'][0]['dtype']} (ms) "
                  f"| (c) Freepik: PIL + timm transform (ms) |", "|---:|---:|---:|"]
        lines += [f"| {p['batch']} | {_f(p['lib_ms'], 2)} | {_f(p['reference_ms'], 2)} |"
                  for p in result["preprocessing"]]
    sd = result.get("sd_pipeline")
    if sd:
        lines += ["", f"Inside a Stable Diffusion pipeline ({sd['unet']} UNet and VAE, random weights, batch "
                      f"{sd['batch']}, {sd['steps']} steps, {sd['size']}x{sd['size']}, {sd['dtype']}, "
                      f"output_type={sd['output_type']!r}, median of {sd['repeats']}):", "",
                  "| checker | pipeline (s) | checker (s) | checker share |", "|---|---:|---:|---:|"]
        names = {"none": "no checker", "clip_default": "diffusers CLIP checker (default)",
                 "drop_in": "NSFWSafetyChecker, drop-in", "attach": "NSFWSafetyChecker, attach (zero-copy)"}
        for r in sd["rows"]:
            if "error" in r:
                lines.append(f"| {names[r['variant']]} | failed: {r['error'][:80]} | | |")
            else:
                lines.append(f"| {names[r['variant']]} | {_f(r['pipeline_s'], 3)} | {_f(r['checker_s'], 3)} | "
                             f"{r['share_pct']:.1f}% |")
    return "\n".join(lines) + "\n"


def summary(result: dict[str, Any]) -> str:
    """The numbers the targets are set on: each path at the largest batch, (a) and (b) against (c)
    on its defaults, and the checker's share of the pipeline."""
    meta = result["meta"]
    rows = [r for r in result["rows"] if "error" not in r]
    lines = []
    for b in sorted({r["batch"] for r in rows}, reverse=True):
        at = [r for r in rows if r["batch"] == b]
        c = next((r for r in at if r["key"] == "c_freepik" and r["default"]), None)
        if b == max(meta["batch_sizes"]):
            lines.append(f"At batch {b} on {meta['device_name']}:")
            lines += [f"  {r['label']}: {r['images_per_s']:,.2f} images/s" for r in at]
        if c is None:
            continue
        for r in at:
            if r["key"][0] in "ab" and (r["default"] or r["key"][0] == "b"):
                lines.append(f"  batch {b}: {r['label']} is {r['images_per_s'] / c['images_per_s']:.2f}x "
                             f"(c) on its defaults")
    for r in (result.get("sd_pipeline") or {}).get("rows", []):
        if "error" not in r and r["variant"] != "none":
            lines.append(f"  pipeline share, {r['variant']}: {r['share_pct']:.2f}%")
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, result: dict[str, Any], table: str) -> None:
    """``<stem>.json`` (the result) and ``<stem>.md`` (the table) in ``out``; the table is printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
