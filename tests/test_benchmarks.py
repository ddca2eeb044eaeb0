"""The benchmark's smoke mode, run in-process: every path, section and file is produced.

Not a timed test: the numbers only have to exist, be positive and be consistent.
"""

from __future__ import annotations

import json
import math
from importlib.metadata import version

import pytest
import torch

from benchmarks.run import main
from nsfw_safety import load_detector

FREEPIK = f"(c) Freepik nsfw-image-detector {version('nsfw-image-detector')}"
PATHS = {  # key, dtype -> label, on a CPU without native bf16 (tests/conftest.py pins that)
    ("a_eager", "fp32"): "(a) nsfw-safety tensors, fp32 eager (default)",
    ("c_freepik", "bf16"): f"{FREEPIK}, bf16 (its default)",
    ("a_eager", "bf16"): "(a) nsfw-safety tensors, bf16 eager",
    ("c_freepik", "fp32"): f"{FREEPIK}, fp32",
    ("d_hf_pipeline", "fp32"): "(d) transformers pipeline, fp32",
    ("e_clip_checker", "fp32"): "(e) diffusers CLIP checker, fp32",
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    returned = main(["--smoke", "--device", "cpu", "--out", str(out)])
    return out, returned


def test_writes_json_and_markdown(smoke):
    out, returned = smoke
    assert sorted(p.name for p in out.iterdir()) == ["cpu-smoke.json", "cpu-smoke.md"]
    written = json.loads((out / "cpu-smoke.json").read_text())
    assert written == json.loads(json.dumps(returned))
    meta = written["meta"]
    assert meta["device"] == "cpu" and meta["smoke"] is True and meta["batch_sizes"] == [1, 2]
    assert meta["torch"] == torch.__version__
    for lib in ("timm", "transformers", "diffusers", "date", "device_name"):
        assert meta[lib]
    assert meta["nsfw_image_detector"] == version("nsfw-image-detector")
    assert meta["peak_rss_mib"] > 0
    assert meta["cpu_bf16"] == {"native": False, "flags": ["avx2"]} and meta["default_dtype"] == "fp32"


def test_rows_cover_every_path_and_batch(smoke):
    rows = smoke[1]["rows"]
    assert [r for r in rows if "error" in r] == []
    seen = {}
    for r in rows:
        assert r["label"] == PATHS[(r["key"], r["dtype"])]
        assert r["default"] == r["label"].endswith("default)")
        seen.setdefault((r["key"], r["dtype"]), []).append(r["batch"])
    # on a CPU without native bf16, bf16 is measured at the first batch size only
    assert seen == {k: [1] if k[1] == "bf16" else [1, 2] for k in PATHS}
    assert list(dict.fromkeys((r["key"], r["dtype"]) for r in rows)) == list(PATHS)  # table order
    for r in rows:
        assert r["latency_ms"] > 0 and len(r["latency_ms_all"]) == 2
        assert r["latency_ms"] == pytest.approx(sorted(r["latency_ms_all"])[0] / 2 + sorted(r["latency_ms_all"])[1] / 2)
        assert r["images_per_s"] == pytest.approx(1e3 * r["batch"] / r["latency_ms"])
        assert r["peak_mem_mib"] is None  # the CPU has no per-call peak: n/a, never made up


def test_arithmetic_and_rates(smoke):
    result = smoke[1]
    arith = result["arithmetic"]
    assert arith["model_input"] == [3, 448, 448]  # tiny, but at 448: Freepik's package feeds 448x448
    assert arith["gflop_per_image"] > 0
    assert set(arith["matmul_peak_tflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in arith["matmul_peak_tflops"].values())
    for r in result["rows"]:
        if r["key"][0] in "ac":  # the EVA paths get a rate and a fraction of their dtype's peak
            assert r["tflops"] == pytest.approx(arith["gflop_per_image"] * r["images_per_s"] / 1e3)
            assert r["peak_fraction"] == pytest.approx(r["tflops"] / arith["matmul_peak_tflops"][r["dtype"]])
        else:
            assert "tflops" not in r


def test_flop_count_matches_the_architecture(smoke):
    # tiny EVA02: 2 blocks, width 32, 32x32 patches of 14 px + a class token = 1025 tokens, 4 classes
    n, d, blocks, hidden = 1025, 32, 2, 85  # timm's eva02 MLP: SwiGLU, hidden int(d * 4 * 2 / 3)
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * n * d * 2 * hidden + 2 * n * hidden * d
    patch_embed = 2 * 1024 * d * 3 * 14 * 14
    expected = blocks * per_block + patch_embed + 2 * d * 4
    assert smoke[1]["arithmetic"]["gflop_per_image"] * 1e9 == pytest.approx(expected, rel=1e-6)


def test_library_and_reference_compute_the_same_function(smoke):
    parity = smoke[1]["parity"]  # this library against Freepik's package, both in fp32
    assert parity["images"] == 2
    assert 0 <= parity["max_abs_level_diff"] < 1e-2


def test_preprocessing_breakdown(smoke):
    pre = smoke[1]["preprocessing"]
    assert [p["batch"] for p in pre] == [1, 2]
    assert all(p["lib_ms"] > 0 and p["reference_ms"] > 0 for p in pre)


def test_stable_diffusion_section(smoke):
    sd = smoke[1]["sd_pipeline"]
    assert (sd["unet"], sd["batch"], sd["steps"], sd["size"]) == ("tiny", 1, 2, 64)
    rows = {r["variant"]: r for r in sd["rows"]}
    assert list(rows) == ["none", "clip_default", "drop_in", "attach"]
    assert all("error" not in r for r in rows.values())
    assert rows["none"]["flags"] is None
    for name in ("clip_default", "drop_in", "attach"):
        r = rows[name]
        assert len(r["flags"]) == 1
        assert 0 < r["checker_s"] < r["pipeline_s"]
        assert r["share_pct"] == pytest.approx(100 * r["checker_s"] / r["pipeline_s"])
        assert math.isfinite(r["added_s"])


def test_markdown_has_every_row(smoke):
    out, result = smoke
    text = (out / "cpu-smoke.md").read_text()
    assert text.startswith("# nsfw-safety benchmark: ")
    assert 'CPU: no native bf16 (avx2; no avx512_bf16 or amx_bf16), so `dtype="auto"` is fp32 on cpu.' in text
    assert "| path | batch | latency (ms) | images/s | peak memory (MiB) | TFLOP/s | of matmul peak |" in text
    table = [line for line in text.splitlines() if line.startswith("| (")]
    assert len(table) == len(result["rows"]) == 10
    for label in PATHS.values():
        assert any(line.startswith(f"| {label} |") for line in table)
    for variant in ("no checker", "diffusers CLIP checker (default)", "NSFWSafetyChecker, drop-in",
                    "NSFWSafetyChecker, attach (zero-copy)"):
        assert f"| {variant} |" in text


def test_compile_mode_is_checked_when_the_detector_is_built(eva_dir):
    with pytest.raises(RuntimeError, match="bogus"):
        load_detector(str(eva_dir), device="cpu", compile="bogus")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_scores(eva_dir):
    x = torch.rand(4, 3, 64, 64, device="cuda") * 2 - 1
    eager = load_detector(str(eva_dir), device="cuda").predict(x, value_range=(-1, 1)).probs
    graphs = load_detector(str(eva_dir), device="cuda", compile="reduce-overhead")
    for _ in range(3):  # CUDA graphs are recorded on the second or third call
        probs = graphs.predict(x, value_range=(-1, 1)).probs.clone()
    torch.testing.assert_close(probs, eager, atol=2e-2, rtol=0)
