"""Distillation on tiny teachers built from ComfyUI's own classes: it must really work.

The teachers have trained-like attention (tiny_models: local_attention, attention_gain),
checked to be far from uniform; random-init attention is near uniform and would make
fidelity claims meaningless.
"""
import os
import signal
import subprocess
import sys
import time
from statistics import mean

import comfy.sample
import pytest
import torch
from safetensors.torch import load_file, save_file

from edit_core.fixtures import tiny_models
from edit_core.bank import DEFAULT_DESIGN, init_bank, load_bank
from edit_core.comfyui.model import conditioning_dims, diffusion_model, model_spec
from edit_core.distill.teacher_data import (TeacherData, cond_bytes, image_bytes, image_jobs, stored_states,
                                     teacher_data_bytes)
from edit_core.distill.checkpoint import FORMAT as CHECKPOINT_FORMAT
from edit_core.distill.config import DistillConfig
from edit_core.distill.examples import starting_noise
from research.distill_checks.evaluate import attention_entropy, final_latent_errors
from edit_core.distill.train import distill
from edit_core.attention.layers import merge_heads, split_heads
from edit_core.comfyui.patcher import TEACHER, apply_edit, call_model, layer_inputs
from edit_core.attention.reference import softmax_attention_ref
from safetensors import safe_open
from helpers import COMFYUI_DIR, REPO, rel_err


TEACHERS = {
    "sd3": (lambda: tiny_models.sd3_patcher(seed=1, attention_gain=4.0, local_attention=True), (256, 256)),
    "pixart": (lambda: tiny_models.pixart_patcher(hidden=144, heads=2, depth=2, seed=1, attention_gain=3.0,
                                                  local_attention=True), (384, 384)),
}
TRAIN = dict(seeds=(0, 1), sample_steps=6, cfg=3.0, train_steps=300, batch_size=4, lr=1e-2, warmup_steps=10,
             checkpoint_every=100)


def conditioner(model):
    dims = conditioning_dims(model)
    return lambda text: tiny_models.random_conditioning(text, 0, 24, *dims)


@pytest.fixture(scope="module", params=list(TEACHERS))
def teacher(request):
    build, resolution = TEACHERS[request.param]
    return request.param, build(), resolution


def test_tiny_teachers_attention_is_far_from_uniform(teacher):
    _, model, resolution = teacher
    cond = conditioner(model)
    ratios = attention_entropy(model, cond("entropy probe"), cond(""), resolution)
    # Mean row entropy as a fraction of log(keys): 1.0 is uniform attention.
    assert all(r < 0.6 for r in ratios.values()), ratios
    assert mean(ratios.values()) < 0.45, ratios


@pytest.mark.slow
def test_distillation_halves_the_final_latent_error_on_held_out_prompts_and_seeds(teacher, tmp_path):
    family, model, resolution = teacher
    cond = conditioner(model)
    prompts, negative = [cond(f"training prompt {i}") for i in range(8)], cond("")
    result = distill(model, prompts, negative, DistillConfig(resolutions=(resolution,), **TRAIN), tmp_path)
    held_out = [cond(f"held-out prompt {i}") for i in range(2)]
    args = (held_out, negative, (101, 102), resolution)
    before = mean(final_latent_errors(model, init_bank(model_spec(model)), *args, steps=6, cfg=3.0))
    after = mean(final_latent_errors(model, result.bank, *args, steps=6, cfg=3.0))
    print(f"{family}: final latent error {before:.4f} -> {after:.4f} ({100 * (1 - after / before):.0f}% less); "
          f"layers {result.layer_errors_before} -> {result.layer_errors_after}")
    assert after <= 0.5 * before
    for name, err in result.layer_errors_before.items():
        assert result.layer_errors_after[name] < 0.5 * err, name


def test_the_teachers_online_features_are_its_softmax_attention():
    """What a training step learns from: the capture sink's layer inputs, through the model's
    own projections, give q, k, v whose float64 softmax attention is the captured output."""
    model = tiny_models.sd3_patcher(seed=2)
    cond = conditioner(model)
    spec = model_spec(model)
    patched = apply_edit(model, init_bank(spec))
    import comfy.model_management
    comfy.model_management.load_models_gpu([patched])
    positive = cond("a")[0]
    conds = {"c_crossattn": positive[0], "y": positive[1]["pooled_output"]}
    x = torch.randn(1, 16, 24, 16, generator=torch.Generator().manual_seed(0))
    captured = {}
    with torch.no_grad():
        call_model(patched, x, torch.tensor([0.7]), conds, TEACHER,
                   lambda name, grid, tensors: captured.__setitem__(name, (grid, dict(tensors))))
    assert sorted(captured) == sorted(spec.layers)
    dm = diffusion_model(model)
    for name, (grid, tensors) in captured.items():
        assert grid == (12, 8)  # 128 px wide, 192 px high
        with torch.no_grad():
            inputs = layer_inputs(dm, name, tensors)
        q, k, v = (split_heads(inputs[n], spec.heads) for n in ("q", "k", "v"))
        if "k_txt" in inputs:  # joint attention: image rows see the prompt keys too
            k = torch.cat((split_heads(inputs["k_txt"], spec.heads), k), dim=-2)
            v = torch.cat((split_heads(inputs["v_txt"], spec.heads), v), dim=-2)
        assert rel_err(tensors["out"], merge_heads(softmax_attention_ref(q, k, v))) < 1e-4, name


def test_teacher_data_is_final_latents_and_its_size_is_known_up_front(tmp_path):
    model = tiny_models.sd3_patcher(seed=1)
    cond = conditioner(model)
    prompts, negative = [cond("a"), cond("b")], cond("")
    config = DistillConfig(resolutions=((128, 128), (192, 128)), seeds=(0, 1), sample_steps=3, cfg=3.0, train_steps=2,
                           batch_size=1, checkpoint_every=100)
    result = distill(model, prompts, negative, config, tmp_path)
    [folder] = tmp_path.glob("teacher-*")
    data = TeacherData(folder)
    for job in image_jobs(config.resolutions, 2, config.seeds):
        image = data.image(job)
        shape = (16, job.resolution[1] // 8, job.resolution[0] // 8)
        assert image["latent"].shape == shape
        sigmas = image["sigmas"]
        assert sigmas.shape == (3,) and bool((sigmas[:-1] > sigmas[1:]).all())  # euler: one call per step
        # Small images keep every call's input; the first is the starting noise (flow: sigma 1).
        assert image["states"].shape == (3, *shape) and image["calls"].tolist() == [0, 1, 2]
        noise = starting_noise(shape, job.seed)[0]
        assert torch.allclose(image["states"][0].float(), noise, atol=2e-3 * float(noise.abs().max()))
    per_prompt = cond_bytes(data.conds(0))
    planned = teacher_data_bytes(16, config.resolutions, 2, 2, per_prompt, config)
    # Planned from above: 2 calls per step (heun), a header's worst case.
    assert 0.5 * planned < data.bytes_on_disk() <= planned
    assert result.teacher_bytes == data.bytes_on_disk()
    # Examples re-noise with the noise KSampler started each image from.
    assert torch.equal(starting_noise((16, 16, 24), 7), comfy.sample.prepare_noise(torch.zeros(1, 16, 16, 24), 7))
    # The target: <= 2 MiB per image at 1024 px (SD3.5: 16 latent channels; states
    # are kept only as far as they fit).
    assert image_bytes(16, (1024, 1024), 20) <= 2 * 2**20 and image_bytes(4, (1024, 1024), 20) <= 2 * 2**20
    assert stored_states(16, (1024, 1024), 40) == 1 and stored_states(4, (1024, 1024), 40) == 13


def cli(tmp_path, *extra, output="bank.safetensors", work=None, env_extra=None, background=False, nproc=None):
    model_file = tmp_path / "teacher.safetensors"
    if not model_file.exists():
        save_file(tiny_models.sd3_state_dict(seed=1, attention_gain=4.0, local_attention=True), str(model_file))
        (tmp_path / "prompts.txt").write_text("a red fox\na blue boat\na city at night\na bowl of fruit\n")
    args = ["--model", str(model_file), "--prompts", str(tmp_path / "prompts.txt"), "--random-conditioning", "24",
            "--output", str(tmp_path / output), "--resolutions", "256", "--seeds", "0,1", "--sample-steps", "4",
            "--cfg", "3", "--batch-size", "4", "--lr", "1e-2", "--work-dir", str(work or tmp_path / "work"), *extra]
    env = dict(os.environ, EDIT_COMFYUI_DIR=str(COMFYUI_DIR),
               **(env_extra or {}))
    head = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)] if nproc else [sys.executable]
    cmd = head + ["-m", "edit_core.distill"] + args
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def banks_equal(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def checkpoint_step(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == CHECKPOINT_FORMAT
    return int(meta["step"])


RESUME_STEPS = ["--train-steps", "150", "--checkpoint-every", "10"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    full = cli(folder, *RESUME_STEPS, output="full.safetensors")
    assert full.returncode == 0, full.stdout + full.stderr
    return folder / "full.safetensors"


@pytest.mark.parametrize("stage,how", [("teacher", signal.SIGKILL), ("train", signal.SIGINT),
                                       ("train", signal.SIGKILL)])
@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_bank(tmp_path, uninterrupted, stage, how):
    proc = cli(tmp_path, *RESUME_STEPS, output="resumed.safetensors", background=True)
    pattern = "teacher-*/image_*.safetensors" if stage == "teacher" else "run-*/checkpoint.safetensors"
    found = None
    deadline = time.time() + 300
    while found is None and proc.poll() is None and time.time() < deadline:
        found = next((tmp_path / "work").glob(pattern), None)
        time.sleep(0.02)
    proc.send_signal(how)
    out, _ = proc.communicate(timeout=120)
    assert found is not None, f"the run never wrote {pattern}: nothing was interrupted\n" + out
    assert not (tmp_path / "resumed.safetensors").exists(), out
    if how == signal.SIGINT:
        assert proc.returncode == 130 and "checkpoint written" in out, out
    if stage == "train":
        assert 0 < checkpoint_step(found) < 150
    else:
        assert len(list((tmp_path / "work").glob("teacher-*/image_*.safetensors"))) < 8, "teacher data was complete"
    again = cli(tmp_path, *RESUME_STEPS, output="resumed.safetensors")
    assert again.returncode == 0, again.stdout + again.stderr
    assert banks_equal(uninterrupted, tmp_path / "resumed.safetensors")


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path):
    steps = ["--train-steps", "12", "--checkpoint-every", "100"]
    one = cli(tmp_path, *steps, output="one.safetensors", work=tmp_path / "w1", env_extra={"OMP_NUM_THREADS": "1"})
    two = cli(tmp_path, *steps, output="two.safetensors", work=tmp_path / "w2", env_extra={"OMP_NUM_THREADS": "1"},
              nproc=2)
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    init = init_bank(model_spec(tiny_models.sd3_patcher(seed=1))).tensors()
    scale = max(float(v.abs().max()) for v in a.values())
    moved = max(float((a[k] - init[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    # Same data, same global batch; only the all-reduce's summation order differs.
    assert moved > 0.01 * scale, "training did not move the bank: the comparison would be empty"
    assert diff < 1e-4 * scale, (diff, scale)


def test_benchmark_script_writes_its_table_and_images(tmp_path):
    done = subprocess.run([sys.executable, "-m", "research.distill_checks.benchmark", "--out", str(tmp_path), "--families",
                           "sd3", "--modes", "layerwise", "--train-steps", "4", "--prompts", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, EDIT_COMFYUI_DIR=str(COMFYUI_DIR)))
    assert done.returncode == 0, done.stdout + done.stderr
    table = (tmp_path / "distill.md").read_text()
    assert "| sd3 | layerwise | 4 |" in table
    assert (tmp_path / "sd3_loss.png").stat().st_size > 1000 and (tmp_path / "sd3_latents.png").stat().st_size > 1000


@pytest.mark.slow
def test_cli_refuses_a_run_that_does_not_fit_the_device_memory_before_any_work(tmp_path):
    """--device-memory plans for that card (the model's own architecture, fake tensors) and
    refuses with the plan's table before teacher data or training start."""
    done = cli(tmp_path, "--train-steps", "4", "--device-memory", "1MiB")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not fit the device's memory; nothing was started" in done.stderr
    assert not (tmp_path / "bank.safetensors").exists()
    assert not list((tmp_path / "work").glob("teacher-*/*.safetensors"))
    fits = cli(tmp_path, "--train-steps", "4", "--device-memory", "24GiB", output="fits.safetensors")
    assert fits.returncode == 0, fits.stdout + fits.stderr
    config = load_bank(tmp_path / "fits.safetensors").config  # no design flags: the default design
    assert {key: getattr(config, key) for key in DEFAULT_DESIGN} == DEFAULT_DESIGN


def test_cli_student_design_options_reach_the_bank_and_train(tmp_path):
    # Issue 11: every student option from the command line, through layer-wise and end-to-end steps.
    done = cli(tmp_path, "--train-steps", "2", "--seeds", "0", "--cf-kernel", "0", "--sc-kernel", "1", "--sc-stride",
               "1", "--local-placement", "outside", "--cf-input", "modulated", "--qkv-rank", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    bank = load_bank(tmp_path / "bank.safetensors")
    config = bank.config
    assert (config.cf_kernel, config.sc_kernel, config.sc_stride, config.local_placement, config.cf_input,
            config.qkv_rank) == (0, 1, 1, "outside", "modulated", 4)
    assert any(torch.count_nonzero(t) for k, t in bank.tensors().items() if k.endswith("qkv_update.up"))


def test_designs_with_the_same_tensors_do_not_share_a_run(tmp_path):
    """cf_input and local_placement change what a bank computes, not its tensors: each design
    gets its own run (a shared one handed the first design's bank to the second)."""
    model = tiny_models.sd3_patcher(seed=1)
    cond = conditioner(model)
    config = DistillConfig(resolutions=((128, 128),), seeds=(0,), sample_steps=2, cfg=3.0, train_steps=2,
                           batch_size=1, checkpoint_every=100)
    spec = model_spec(model)
    banks = {}
    for design in ({"local_placement": "inside"}, {"local_placement": "outside"}, {"cf_input": "modulated"}):
        start = init_bank(spec, **design)
        assert start.tensors().keys() == init_bank(spec).tensors().keys()
        banks[str(design)] = distill(model, [cond("a")], cond(""), config, tmp_path, bank=start).bank
    assert len(list(tmp_path.glob("run-*"))) == 3
    assert [b.config.local_placement for b in banks.values()] == ["inside", "outside", "inside"]
    assert [b.config.cf_input for b in banks.values()] == ["residual", "residual", "modulated"]
