"""The benchmark's machinery on tiny widths (fast; timings here mean nothing), its command
line, its plots, the GPU check script at CPU-smoke size, the Amdahl stand-in, and linear
memory of the EDiT path measured with the benchmark's own counter."""
import json
import os
import subprocess
from pathlib import Path

import comfy.model_management
import numpy as np
import pytest
import torch

from research.bench.__main__ import TINY, parse, parser
from research.bench.backends import SDPA, ZeroCostAttention
from research.bench.cases import Case, Point
from research.bench.report import merge
from research.bench.run import run_benchmark
from edit_core.util.memory import measure_peak
from edit_core.comfyui.patcher import edit_bank_of
from edit_core.attention.layers import HybridEDiTAttention
from edit_core.util.plots import H, MARGIN, W, _fmt, _ticks, line_chart

REPO = Path(__file__).resolve().parents[2]


def test_tiny_benchmark_writes_table_json_and_plots_for_every_level(tmp_path):
    threads = torch.get_num_threads()
    rows, paths = run_benchmark(resolutions=[384], batches=[1, 2], prompts=[7], repeats=2, budget=5.0,
                                out=tmp_path, threads=1, tiny=True, log=lambda s: None)
    assert torch.get_num_threads() == threads  # the run's thread count is undone
    assert all(r.compiled is None for r in rows)
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


def test_block_level_times_block_0_of_a_patched_model_call_and_stops_there(monkeypatch):
    import research.bench.cases as cases
    # Baseline and EDiT run under this counter instead of plain SDPA: it sees which calls are
    # image self-attention (as many keys as queries).
    counter = ZeroCostAttention(SDPA)
    monkeypatch.setattr(cases, "SDPA", counter)
    case = Case("sd35", "block", torch.float32, "cpu", tiny=True)
    try:
        later = []
        case.patcher.model.diffusion_model.joint_blocks[1].register_forward_hook(lambda *a: later.append(1))
        variants, extras = case.variants(Point("sd35", "block", 384, 1, 7))
        for name in ("bound", "baseline", "edit"):
            counter.new_run()
            assert isinstance(variants[name](), float)
            if name == "baseline":  # joint attention and MMDiT-X attn2 of block 0
                assert counter.skipped == 2
            if name == "edit":  # EDiT ran in block 0: no image self-attention reached ComfyUI's function
                assert counter.skipped == 0 and counter.passed > 0
        assert extras["bound"].skipped == 2
        assert later == []  # every call stopped after block 0
        # The bank was loaded with the model, as a sampler loads it.
        bank = edit_bank_of(case.patcher)
        assert any(m.model.model is bank for m in comfy.model_management.current_loaded_models)
    finally:
        case.close()


def test_cli_rejects_abbreviations_and_takes_space_and_comma_lists():
    with pytest.raises(SystemExit):
        parser().parse_args(["--resolution", "512"])
    args = parse(["--resolutions", "512,1024", "2048", "--levels", "block,model", "--batches", "1"])
    assert args.resolutions == [512, 1024, 2048] and args.levels == ["block", "model"] and args.batches == [1]
    for bad in (["--levels", "block,nosuch"], ["--resolutions", "5x2"]):
        with pytest.raises(SystemExit):
            parse(bad)
    text = " ".join(parser().format_help().split())
    assert "see --help" not in text and "(default: 512 1024 2048 4096)" in text


def test_tiny_preset_is_small_and_explicit_options_win():
    args = parse(["--tiny"])
    assert args.tiny and args.resolutions == TINY["resolutions"] and args.repeats == 1 and max(args.resolutions) <= 512
    assert parse(["--tiny", "--resolutions", "384"]).resolutions == [384]


def test_plot_labels_every_tick_on_both_axes():
    assert [_fmt(v) for v in (4096, 512, 65536, 250000, 2.5, 0.05, 1e-5)] == ["4096", "512", "65,536", "250,000",
                                                                              "2.5", "0.05", "1.0e-05"]
    assert _ticks(1.6, 9.0, log=True) == [1.0, 2.0, 5.0, 10.0]  # inside one decade: still labelled
    assert len(_ticks(0.5, 2e5, log=True)) <= 8
    assert _ticks(0, 200, log=False) == [0, 50, 100, 150, 200]  # linear: 4-6 steps, none past the data
    assert _ticks(0, 7199, log=False) == [0, 2000, 4000, 6000, 8000]  # a training run's steps: not 73 labels
    pxs = [512, 1024, 2048, 4096]
    img = line_chart("t", {"a": (pxs, [2.0, 9.0, 80.0, 900.0])}, "image side, px", "ms", log_x=True, log_y=True,
                     x_ticks=pxs)
    a = np.asarray(img.convert("L"))
    left, top, right, bottom = MARGIN
    below_axis = a[H - bottom + 8:H - bottom + 28]
    for i in range(len(pxs)):  # a label under each resolution
        x = int(left + i / (len(pxs) - 1) * (W - left - right))
        assert (below_axis[:, max(0, x - 12):x + 12] < 128).sum() > 10, pxs[i]
    left_of_axis = a[top:H - bottom, :left - 6]
    rows_with_text = np.flatnonzero((left_of_axis < 128).any(axis=1))
    assert len(rows_with_text) and np.ptp(rows_with_text) > (H - top - bottom) / 2  # y labels spread up the axis


def test_gpu_check_script_runs_at_cpu_smoke_size(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path))
    cmd = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--resolutions", "384", "--batches", "1",
           "--families", "sd35"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {(r["level"], r["compiled"]) for r in rows} == {("model", None), ("block", None), ("model", "eager")}
    compiled = next(r for r in rows if r["compiled"])
    assert set(compiled["graph_breaks"]) == {"baseline", "edit", "bound"}
    assert all(isinstance(v, int) for v in compiled["graph_breaks"].values())
    assert all(r["times"][n] for r in rows for n in ("baseline", "edit", "bound"))
    md = (tmp_path / "results.md").read_text()
    assert "compiled (eager)" in md and "not checked: tiny widths" in md
    assert {p.name for p in tmp_path.glob("*.png")} == {"model_sd35_b1_p16.png", "block_sd35_b1_p16.png",
                                                        "model_sd35_b1_p16_eager.png"}
    assert all((tmp_path / stage / "results.json").exists() for stage in ("model_eager", "block_eager",
                                                                          "model_compiled"))
