"""Distillation that cannot be tricked or silently wrong: the teacher's fingerprint, broken
checkpoints and teacher files, non-finite training, and the CLI's checks before any work."""
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfy.lora
import comfy.sd
from comfy_extras.nodes_model_advanced import ModelSamplingSD3

from edit_core.fixtures import tiny_models
from edit_core.bank import EDiTError
from edit_core.comfyui.model import conditioning_dims
from edit_core.distill.teacher_data import FORMAT as TEACHER_FORMAT, TeacherData, image_jobs
from edit_core.distill.config import DistillConfig, parse_ints, parse_resolutions
from edit_core.distill.report import layer_error_chart, report_text
from edit_core.distill.train import DistillResult, check_work_dir, distill, teacher_fingerprint
from edit_core.bank import init_bank
from edit_core.comfyui.model import model_spec
from helpers import COMFYUI_DIR, REPO

SMALL = dict(resolutions=((128, 128),), seeds=(0,), sample_steps=2, cfg=3.0, train_steps=4, batch_size=2,
             checkpoint_every=2)


def conditioner(model):
    dims = conditioning_dims(model)
    return lambda text: tiny_models.random_conditioning(text, 0, 24, *dims)


@pytest.fixture(scope="module")
def model():
    return tiny_models.sd3_patcher(seed=1)


def with_lora(model, strength):
    """The tiny model with a rank-4 LoRA on one projection, through ComfyUI's LoRA loader."""
    g = torch.Generator().manual_seed(5)
    name = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    lora = {f"{name}.lora_up.weight": torch.randn(384, 4, generator=g),
            f"{name}.lora_down.weight": torch.randn(4, 128, generator=g), f"{name}.alpha": torch.tensor(4.0)}
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
    assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight" in patched.patches
    return patched


def test_a_changed_lora_strength_or_sampling_shift_gets_fresh_teacher_data(model, tmp_path):
    cond = conditioner(model)
    prompts, negative, config = [cond("a")], cond(""), DistillConfig(**SMALL)
    fp = lambda m: teacher_fingerprint(m, prompts, negative, config)  # noqa: E731
    base = fp(model)
    assert fp(model.clone()) == base  # a clone is the same teacher
    half, full = with_lora(model, 0.5), with_lora(model, 1.0)
    assert len({base, fp(half), fp(full)}) == 3
    shift3, shift6 = (ModelSamplingSD3().patch(model, s)[0] for s in (3.0, 6.0))
    assert len({base, fp(shift3), fp(shift6)}) == 3
    # A loaded LoRA clone bakes its patch into the shared module; the base model's identity stays.
    import comfy.model_management
    comfy.model_management.load_models_gpu([full])
    assert fp(model) == base and fp(with_lora(model, 1.0)) == fp(full)
    comfy.model_management.unload_all_models()

    # And distill uses it: only the shift changed -> a second teacher folder.
    distill(model, prompts, negative, config, tmp_path)
    distill(shift6, prompts, negative, config, tmp_path)
    assert len(list(tmp_path.glob("teacher-*"))) == 2


def test_a_broken_checkpoint_is_refused_with_what_to_do(model, tmp_path):
    cond = conditioner(model)
    args = ([cond("a")], cond(""), DistillConfig(**SMALL), tmp_path)
    distill(model, *args)
    [checkpoint] = tmp_path.glob("run-*/checkpoint.safetensors")
    good = checkpoint.read_bytes()
    cases = {"truncated": good[:len(good) // 2], "random bytes": os.urandom(4096),
             "a zip archive": b"PK\x03\x04" + os.urandom(200)}
    for what, content in cases.items():
        checkpoint.write_bytes(content)
        with pytest.raises(EDiTError) as e:
            distill(model, *args)
        assert f"checkpoint is not valid, delete {checkpoint} or pick another work folder" in str(e.value), what
    # A valid safetensors file that is not this run's checkpoint (here: a bank).
    save_file({"w": torch.zeros(2)}, str(checkpoint), {"format": "comfyui-edit-bank"})
    with pytest.raises(EDiTError, match="not a distillation checkpoint"):
        distill(model, *args)
    checkpoint.write_bytes(good)
    assert distill(model, *args).resumed_from == 4


def test_a_broken_teacher_file_is_regenerated(model, tmp_path):
    cond = conditioner(model)
    args = ([cond("a")], cond(""), DistillConfig(**SMALL), tmp_path)
    first = distill(model, *args)
    [folder] = tmp_path.glob("teacher-*")
    data = TeacherData(folder)
    [job] = image_jobs(SMALL["resolutions"], 1, SMALL["seeds"])
    image = data.image(job)
    path = data.image_path(job)
    path.write_bytes(path.read_bytes()[:100])
    for run in tmp_path.glob("run-*"):
        for f in run.iterdir():
            f.unlink()
    assert data.image(job) is None
    second = distill(model, *args)
    again = data.image(job)
    assert all(torch.equal(again[k], image[k]) for k in image)
    # A well-formed file of ours with shapes its image cannot have is not used either.
    planted = dict(image, latent=torch.zeros(16, 2, 2))
    save_file(planted, str(path), {"format": TEACHER_FORMAT})
    assert data.image(job) is None and not data.has(job, needs_negative=True)
    assert all(torch.equal(a, b) for a, b in zip(first.bank.tensors().values(), second.bank.tensors().values()))


def test_non_finite_training_stops_with_the_step_and_cause_and_keeps_the_last_finite_checkpoint(model, tmp_path):
    cond = conditioner(model)
    config = DistillConfig(**dict(SMALL, lr=1e30, train_steps=6, checkpoint_every=1))
    with pytest.raises(EDiTError) as e:
        distill(model, [cond("a")], cond(""), config, tmp_path)
    message = str(e.value)
    assert "stopped at step" in message and "not finite" in message and "learning rate (1e+30)" in message, message
    step = int(message.split("stopped at step ")[1].split(":")[0])
    assert step > 1  # step 1 is finite: lr warm-up starts small; later steps blow up
    [checkpoint] = tmp_path.glob("run-*/checkpoint.safetensors")
    with safe_open(str(checkpoint), framework="pt") as f:
        assert int(f.metadata()["step"]) < step
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())


@pytest.mark.parametrize("field,value", [("cfg", float("nan")), ("lr", float("inf")), ("cfg", -1.0)])
def test_settings_that_cannot_train_are_refused(field, value):
    with pytest.raises(EDiTError, match=field):
        DistillConfig(**{field: value})


def test_an_unwritable_or_full_work_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(EDiTError, match="not writable"):
        check_work_dir(blocker / "work", 0)
    free = __import__("shutil").disk_usage(tmp_path).free
    with pytest.raises(EDiTError, match="MiB free") as e:
        check_work_dir(tmp_path / "work", free + 2**40)
    assert str(tmp_path / "work") in str(e.value)
    check_work_dir(tmp_path / "work", 1)


def test_reports_and_charts_survive_non_finite_errors(model):
    bank = init_bank(model_spec(model))
    result = DistillResult(bank, DistillConfig(), layer_errors_before={n: 0.5 for n in bank.config.layers},
                           layer_errors_after={n: math.nan for n in bank.config.layers})
    assert layer_error_chart(result).size[0] > 100
    assert "nan" in report_text(result)


def test_list_options_take_spaces_and_commas():
    assert parse_ints(["0", "1", "2"]) == parse_ints("0,1,2") == parse_ints(["0,1", "2"]) == (0, 1, 2)
    assert parse_resolutions(["512", "768x512"]) == parse_resolutions("512,768x512") == ((512, 512), (768, 512))
    with pytest.raises(EDiTError, match="768y"):
        parse_resolutions(["768y"])


def run_cli(*args, timeout=120):
    env = dict(os.environ, EDIT_COMFYUI_DIR=str(COMFYUI_DIR))
    return subprocess.run([sys.executable, "-m", "edit_core.distill", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_help_shows_defaults_and_abbreviations_are_refused():
    done = run_cli("--help")
    assert done.returncode == 0 and "(default: 20)" in done.stdout and "(default: layerwise+e2e)" in done.stdout
    done = run_cli("--model", "m", "--output", "o", "--resolution", "512")
    assert done.returncode == 2 and "unrecognized arguments: --resolution" in done.stderr


@pytest.mark.slow
def test_cli_refuses_missing_files_and_unwritable_outputs_before_loading_anything(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not loaded")  # the checks come first: this is never read
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    base = ["--prompts", str(prompts), "--output", str(tmp_path / "bank.safetensors")]
    cases = [
        (["--model", str(tmp_path / "nosuch.safetensors"), *base], "--model", "no such file"),
        (["--model", str(model), "--prompts", str(tmp_path / "nosuch.txt"), "--output", str(tmp_path / "b")],
         "--prompts", "no such file"),
        (["--model", str(model), *base, "--text-encoders", str(tmp_path / "t5.safetensors")], "--text-encoders",
         "no such file"),
        (["--model", str(model), "--prompts", str(prompts), "--output", str(blocker / "bank.safetensors")],
         "--output", "is a file, not a folder"),
        (["--model", str(model), *base, "--cfg", "nan"], "cfg", "finite"),
        (["--model", str(model), *base, "--cf-kernel", "2"], "--cf-kernel 2",
         "must be an odd whole number from 1 to 15 or 0 (no ConvFusion)"),
        (["--model", str(model), *base, "--qkv-rank", "999"], "--qkv-rank 999", "must be a whole number from 0 to 256"),
    ]
    for args, flag, why in cases:
        done = run_cli(*args, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0].startswith("error: ") and flag in lines[0] and why in lines[0], lines
