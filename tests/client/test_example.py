"""The main job (scripts/run_example.sh -> python -m edit_core.client.example): its own ComfyUI
server, the example workflow with EDiT on and off, timings, real images; and its one-line
errors for a missing workflow or models folder."""
import json
import subprocess
import time

import numpy as np
import pytest

from edit_core.client.example import build_parser, flat, main
from helpers import REPO, assert_real_image


@pytest.mark.server  # starts its own ComfyUI server
@pytest.mark.slow
def test_example_runs_on_the_tiny_models_and_makes_real_images(tmp_path, capsys):
    assert main(["--family", "pixart", "--sizes", "384", "--seeds", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TINY random models" in out
    assert "| 384x384 |" in out and "speed-up" in out and "4/4 runs succeeded" in out
    rows = [json.loads(line) for line in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["job"]["edit"] for r in rows) == [False, False, True, True]
    images = {}
    for r in rows:
        [name] = r["files"]
        images[(r["job"]["prompt"], r["job"]["edit"])] = assert_real_image(tmp_path / "batch" / name)
    for prompt in {p for p, _ in images}:
        on, off = images[(prompt, True)], images[(prompt, False)]
        assert np.abs(on - off).mean() > 1e-3, "EDiT on and off gave the same image"
    assert "invalid value encountered" not in (tmp_path / "server.log").read_text()


def run_example(*args, env_extra=None):
    """The user's command, timed: bash scripts/run_example.sh ..."""
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(REPO / "scripts" / "run_example.sh"), *args], capture_output=True,
                          text=True, timeout=120)
    return proc, time.monotonic() - t0


def one_line_error(proc):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return lines[0]


def test_a_missing_workflow_is_a_one_line_error_before_any_work(tmp_path):
    proc, seconds = run_example("--workflow", str(tmp_path / "my_api_workflow.json"), "--out", str(tmp_path / "run"))
    line = one_line_error(proc)
    assert "my_api_workflow.json does not exist" in line and "Export (API)" in line
    assert not (tmp_path / "run").exists() and seconds < 60


def test_a_ui_format_workflow_is_refused_in_one_line(tmp_path):
    proc, _ = run_example("--workflow", str(REPO / "workflows" / "sd35_medium_edit.json"), "--out", str(tmp_path / "run"))
    assert "UI-format" in one_line_error(proc)
    assert not (tmp_path / "run").exists()


def test_a_models_folder_that_does_not_exist_is_named(tmp_path):
    proc, _ = run_example("--family", "pixart", "--models", str(tmp_path / "nosuch"), "--out", str(tmp_path / "run"))
    line = one_line_error(proc)
    assert f"{tmp_path / 'nosuch'} does not exist" in line and "EDIT_MODELS_DIR" in line and "lacks" not in line
    assert not (tmp_path / "run").exists()


def test_a_models_folder_without_the_workflow_s_files_is_refused_by_name(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    proc, _ = run_example("--models", str(tmp_path), "--out", str(tmp_path / "run"))
    line = one_line_error(proc)
    assert "lacks" in line and "does not exist" not in line
    assert "checkpoints/sd3.5_medium.safetensors" in line and "edit/sd35_medium_edit.safetensors" in line
    assert "sd35_distill_edit" in line
    assert not (tmp_path / "run").exists()


def test_the_pixart_hint_names_a_pixart_way_to_make_the_bank(tmp_path):
    proc, _ = run_example("--family", "pixart", "--models", str(tmp_path), "--out", str(tmp_path / "run"))
    line = one_line_error(proc)
    assert "diffusion_models/PixArt-Sigma-XL-2-2K-MS.pth" in line and "edit/pixart_sigma_edit.safetensors" in line
    assert "PixArt" in line.split("lacks", 1)[1].split(";", 1)[1] and "sd35_distill_edit" not in line


def test_cli_lists_take_spaces_and_commas_and_no_abbreviations(capsys):
    args = build_parser().parse_args(["--seeds", "0,1", "2", "--sizes", "512", "1024,1536x1024"])
    assert flat(args.seeds) == [0, 1, 2]
    assert flat(args.sizes) == [(512, 512), (1024, 1024), (1536, 1024)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fam", "pixart"])
    assert "unrecognized arguments: --fam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "(default: sd3)" in capsys.readouterr().out
