"""The benchmark's machinery on tiny widths (fast; timings here mean nothing), the Amdahl
stand-in, and linear memory of the EDiT path measured with the benchmark's own counter."""
import json

import torch

from edit_core.bench import run_benchmark
from edit_core.bench.report import merge
from edit_core.bench.backends import SDPA, ZeroCostAttention
from edit_core.memory import measure_peak
from edit_core.modules import HybridEDiTAttention


def test_tiny_benchmark_writes_table_json_and_plots_for_every_level(tmp_path):
    rows, paths = run_benchmark(resolutions=[384], batches=[1, 2], prompts=[7], repeats=2, budget=5.0,
                                out=tmp_path, tiny=True, log=lambda s: None)
    assert {(r.level, r.family) for r in rows} == {(lv, f) for lv in ("attention", "block", "model")
                                                   for f in ("sd35", "pixart")}
    for r in rows:
        assert r.tokens == (384 // 16) ** 2 and all(r.median(n) > 0 for n in r.times)
        assert r.speedup > 0
        if r.level != "attention":
            assert r.median("bound") > 0 and r.zero_cost_calls > 0, r
            assert 0 < r.fraction
        if r.level != "attention" and r.family == "pixart":
            assert r.passed_calls > 0  # PixArt's cross-attention runs for real in the bound
    md = paths["table"].read_text()
    assert "| block | sd35 | 384 |" in md and "TINY" in md and "## Targets" in md
    data = json.loads(paths["json"].read_text())
    assert len(data["rows"]) == len(rows) and data["machine"]["cores"]
    pngs = [p for k, p in paths.items() if str(p).endswith(".png")]
    assert len(pngs) == 3 * 2 * 2 and all(p.stat().st_size > 1000 for p in pngs)

    merged = merge([tmp_path], tmp_path / "merged", "cpu")
    assert merged["table"].read_text().count("| block |") == md.count("| block |")


def test_zero_cost_attention_skips_self_attention_and_runs_cross_attention():
    zero = ZeroCostAttention(SDPA)
    q, k_cross = torch.randn(2, 9, 32), torch.randn(2, 4, 32)
    assert torch.equal(zero(q, q, q, heads=2), torch.zeros(2, 9, 32))
    assert torch.allclose(zero(q, k_cross, k_cross, heads=2), SDPA(q, k_cross, k_cross, heads=2))
    q4 = torch.randn(2, 2, 9, 16)
    assert zero(q4, q4, q4, heads=2, skip_reshape=True).shape == (2, 9, 32)
    assert (zero.skipped, zero.passed) == (2, 1)


def test_edit_layer_memory_grows_linearly_and_holds_no_n_by_n_tensor():
    layer = HybridEDiTAttention(64, 1, reduction=8).eval()
    peaks = {}
    for side in (64, 128):  # 4096 and 16384 image tokens
        n = side * side
        x, q, k, v = (torch.randn(1, n, 64) for _ in range(4))
        txt = [torch.randn(1, 77, 64) for _ in range(3)]
        with torch.no_grad():
            peaks[n] = measure_peak(lambda: layer(x, *txt, q, k, v, (side, side)), "cpu")["peak_extra_bytes"]
    n = 16384
    assert peaks[n] < n * n * 4 / 16, f"peak {peaks[n]} B: an N x N float32 tensor would be {n * n * 4} B"
    assert peaks[n] / peaks[4096] <= 4.5, peaks
