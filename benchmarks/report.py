"""The Markdown table of a benchmark run (the JSON holds every number)."""

from __future__ import annotations

from typing import Any


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    meta, arith = result["meta"], result["arithmetic"]
    lines = [
        f"# nsfw-safety benchmark: {meta['device_name']}{' (smoke run: tiny models)' if meta['smoke'] else ''}",
        "",
        f"{meta['date']} · torch {meta['torch']} · timm {meta['timm']} · transformers {meta['transformers']} · "
        f"diffusers {meta['diffusers']}" + (f" · CUDA {meta['cuda']}" if meta["cuda"] else "")
        + f" · {meta['cpu_threads']} CPU threads · load average {meta['load_average_start'][0]:.1f} at start",
        "",
        f"Model: {meta['model']}. Input: decoded {meta['image_size']}x{meta['image_size']} images "
        f"(tensors in [-1, 1], or PIL for (c), (d)). "
        f"Median of {meta['repeats']} timed calls after warm-up (the paths take turns, call by call), "
        f"fresh random images every call.",
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
    if result["parity"]:
        lines.append(f"Parity: (a) and (c) on the same {result['parity']['images']} images differ by at most "
                     f"{result['parity']['max_abs_prob_diff']:.2e} in probability (fp32).")
    if result["preprocessing"]:
        lines += ["", "Preprocessing alone (decoded image to model input):", "",
                  "| batch | (a) tensors, on the device (ms) | (c) PIL + timm transform (ms) |", "|---:|---:|---:|"]
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
