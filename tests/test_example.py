"""The main job (scripts/run_example.sh -> python -m edit_core.example): its own ComfyUI
server, the example workflow with EDiT on and off, timings."""
import json

import pytest

from edit_core.example import main


def test_example_runs_on_the_tiny_models_and_says_so(tmp_path, capsys):
    assert main(["--family", "pixart", "--sizes", "384", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "TINY random models" in out
    assert "| 384x384 |" in out and "speed-up" in out and "4/4 runs succeeded" in out
    rows = [json.loads(line) for line in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()]
    assert sorted(r["job"]["edit"] for r in rows) == [False, False, True, True]


def test_a_models_folder_without_the_workflow_s_files_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(SystemExit):
        main(["--models", str(tmp_path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "checkpoints/sd3.5_medium.safetensors" in err and "edit/sd35_medium_edit.safetensors" in err
    assert not (tmp_path / "run").exists()
