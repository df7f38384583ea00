"""Memory and operations known before a distillation starts: the tensor-memory counter on
real and fake tensors, the fake-tensor measurement of ComfyUI's own model classes against a
real run, operations counted and turned into time, the plan table and check_fits's refusal,
the real architectures' sizes."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch._subclasses.fake_tensor import FakeTensorMode

import comfy.sd

from edit_core.bank import EDiTError
from edit_core.distill import plan as P
from edit_core.distill.plan import cli as plan_cli
from edit_core.distill.plan.harness import arch_key
from edit_core.distill.config import DistillConfig
from edit_core.util.memory import PeakTensorMemory
from edit_core.comfyui.architectures import (PIXART_SIGMA, SD35_MEDIUM, model_config_for, model_config_from_file,
                                   model_config_from_unet_config)
from edit_core.fixtures.tiny_models import sd3_patcher, sd3_state_dict

MB = 512 * 512 * 4  # one 512 x 512 float32 tensor

TINY_SD3 = dict(SD35_MEDIUM, depth=2, num_patches=32 * 32, pos_embed_max_size=32, x_block_self_attn_layers=[0],
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 128}})
TINY_PIXART = dict(PIXART_SIGMA, hidden_size=96, num_heads=4, depth=2)


def _work(x, w):
    a = x @ w            # +1
    b = a.relu()         # +1 (peak 2)
    del a                # -1
    c = b.t() * 2        # a view (nothing) then +1: 2 again
    x.add_(1)            # in place into memory that existed before: nothing
    w.t()                # a view of it: nothing
    kept = b.untyped_storage()  # an alias the dispatcher never sees keeps b's memory
    del b
    d = c + 1            # +1: 3, b is still alive through ``kept``
    return c, d, kept


@pytest.mark.parametrize("fake", [False, True])
def test_counter_counts_live_storages_on_real_and_fake_tensors(fake):
    mode = FakeTensorMode() if fake else None
    with mode or torch.no_grad():
        x, w = torch.randn(512, 512), torch.randn(512, 512)
        with PeakTensorMemory() as counter:
            c, d, kept = _work(x, w)
            assert counter.live == 3 * MB
            del kept, d
            c + 0  # the next operator sees what was freed
            assert counter.live == 2 * MB  # c and the new sum; b and d are gone
        assert counter.peak == 3 * MB


def test_counter_follows_autograd():
    x = torch.randn(512, 512, requires_grad=True)
    with PeakTensorMemory() as counter:
        (x * 2).relu().sum().backward()  # saved activation + output, then the gradient
    # the saved activation and one gradient at a time, plus scalars; x.grad stays
    assert 2 * MB <= counter.peak <= 2 * MB + 64 and MB <= counter.live <= MB + 64


@pytest.mark.parametrize("unet_config", [TINY_SD3, TINY_PIXART], ids=["sd3", "pixart"])
def test_fake_measurement_equals_the_real_runs_counted_peak(unet_config):
    """The same ComfyUI model class, bank and step, once with fake tensors and once for real
    on this CPU: the counted peaks agree (fake tensors take the same kernels' output shapes)."""
    config = model_config_from_unet_config(unet_config, "tiny")
    fake, real = (P.PlanModel(config, None, torch.bfloat16, fake=f) for f in (True, False))
    assert (fake.weights, fake.bank_bytes, fake.optimizer_bytes) == (real.weights, real.bank_bytes, real.optimizer_bytes)
    for what in ("teacher", "layerwise", "e2e"):
        f, r = (P.measure(m, what, 1, (320, 256)) for m in (fake, real))  # PixArt needs >= 256 px
        assert r.counted > 0 and abs(f.counted - r.counted) <= 0.02 * r.counted, (what, f, r)
        assert f.resident == r.resident


def test_counted_operations_agree_fake_and_real_and_with_the_linear_layers_by_hand():
    """The teacher pass's operations, counted on fake tensors, equal the count of a real run,
    and are the linear layers' 2 x in x out per token (counted here by hooks) plus attention
    and the patch embedding, which are a small remainder at this size."""
    config = model_config_from_unet_config(TINY_SD3, "tiny")
    fake, real = (P.PlanModel(config, None, torch.bfloat16, fake=f) for f in (True, False))
    for what in ("teacher", "layerwise", "e2e"):
        f, r = (P.measure(m, what, 1, (320, 256)) for m in (fake, real))
        assert f.flops == r.flops > 0, what
    by_hand = []

    def linear(module, args, out):
        by_hand.append(2 * args[0].numel() // module.in_features * module.in_features * module.out_features)
    hooks = [m.register_forward_hook(linear) for m in real.trainer.model.diffusion_model.modules()
             if isinstance(m, torch.nn.Linear)]
    try:
        real.teacher_pass((320, 256))
    finally:
        for h in hooks:
            h.remove()
    teacher = P.measure(real, "teacher", 1, (320, 256)).flops
    linear_flops = sum(by_hand) / 2  # the harness runs the pass twice: bytes, then operations
    assert linear_flops <= teacher <= 1.5 * linear_flops
    # A training step (one example, where the teacher pass has CFG's two rows) runs the teacher's
    # forward and the student's forward and backward: layer by layer, or the whole model.
    assert teacher / 2 < P.measure(real, "layerwise", 1, (320, 256)).flops < P.measure(real, "e2e", 1, (320, 256)).flops


def test_run_cost_adds_every_image_and_phase_and_the_table_says_the_time():
    config = model_config_from_unet_config(TINY_SD3, "tiny")
    run = DistillConfig(resolutions=((256, 256), (384, 384)), seeds=(0, 1), mode="layerwise+e2e", train_steps=10,
                        sample_steps=3)
    plan = P.make_plan(config, "tiny", run.resolutions, run.mode, 1, P.device_budget("cuda", P.GiB, 24 * P.GiB),
                       prompts=4, seeds=2, distill_config=run)
    model = P.fake_model(arch_key(config), "", "bfloat16")
    teacher = {r: P.measure(model, "teacher", 1, r).flops for r in run.resolutions}
    assert plan.cost["teacher_flops"] == 8 * 3 * (teacher[(256, 256)] + teacher[(384, 384)])
    assert plan.cost["train_flops"] == sum(p.steps * P.measure(model, p.mode, run.batch_size, p.resolution).flops
                                           for p in run.phases())
    assert [p.steps for p in run.phases()] == [2, 3, 2, 3]
    seconds = plan.throughput.seconds(plan.cost["teacher_flops"] + plan.cost["train_flops"])
    assert seconds == (plan.cost["teacher_flops"] + plan.cost["train_flops"]) / (165e12 * 0.35)
    table = plan.table()
    assert "time on the assumed card, 165 TFLOPS bf16 x 35% utilisation" in table and "- in all: " in table


def test_a_batch_runs_example_by_example_and_e2e_holds_more_than_layerwise():
    model = P.fake_model(arch_key(model_config_from_unet_config(TINY_SD3, "tiny")), "", "bfloat16")
    one, two = (P.measure(model, "e2e", b, (256, 256)) for b in (1, 2))
    # examples run one after the other: activations do not stack; the second example's inputs and
    # its gradients beside the accumulated ones (at most one more bank) are all that is added
    assert one.counted < two.counted <= one.counted + model.bank_bytes + 2 * 2 ** 20
    assert P.measure(model, "layerwise", 1, (256, 256)).counted < one.counted
    assert P.measure(model, "e2e", 1, (256, 256), layers_per_step=1).counted < one.counted  # fewer layer outputs held


def test_plan_table_for_the_tiny_models():
    for name, unet_config in (("tiny-sd3", TINY_SD3), ("tiny-pixart", TINY_PIXART)):
        config = model_config_from_unet_config(unet_config, name)
        plan = P.make_plan(config, name, [(512, 512), (384, 384)], "layerwise+e2e", 1,
                           P.device_budget("cuda", P.GiB, 24 * P.GiB), prompts=4, seeds=2)
        assert [(r.resolution, r.mode) for r in plan.rows] == [((384, 384), "layerwise"), ((384, 384), "e2e"),
                                                               ((512, 512), "layerwise"), ((512, 512), "e2e")]
        assert plan.fits and not plan.suggestions
        table = plan.table()
        assert "| 512 px | e2e | 1 |" in table and "teacher data on disk" in table and "budget 23.00 GiB" in table
        assert plan.teacher_data["images"] == 16


def test_check_fits_refuses_an_impossible_budget_with_the_table_and_a_setting_that_fits():
    patcher = sd3_patcher(depth=2)
    small = DistillConfig(resolutions=((256, 256),), seeds=(0, 1), mode="layerwise", train_steps=10)
    config = DistillConfig(resolutions=((256, 256), (512, 512)), seeds=(0, 1), mode="layerwise", train_steps=10)
    fits = P.check_fits(patcher, small, None, "cpu", device_memory=64 * P.GiB)
    need = max(fits.rows[0].teacher.peak, fits.rows[0].step.peak)
    with pytest.raises(EDiTError) as e:
        P.check_fits(patcher, config, None, "cpu", reserve=0, device_memory=need)
    message = str(e.value)
    assert "nothing was started" in message and "| 512 px | layerwise | 2 |" in message and "NO |" in message
    assert "settings that would fit" in message and "--resolutions 256 (top resolution 256 px)" in message
    assert P.check_fits(patcher, config, None, "cpu").refuse is False  # on a CPU nothing is refused


def test_real_architectures_at_full_size_build_fake_in_seconds():
    sd35 = P.fake_model(arch_key(model_config_for("sd35-medium")), "", "bfloat16")
    assert (sd35.spec.depth, sd35.spec.hidden_size, sd35.spec.heads, len(sd35.spec.layers)) == (24, 1536, 24, 37)
    assert 2.2e9 < sd35.parameters < 2.3e9
    pixart = P.fake_model(arch_key(model_config_for("pixart-sigma")), "", "bfloat16")
    assert (pixart.spec.depth, pixart.spec.hidden_size, pixart.spec.heads, len(pixart.spec.layers)) == (28, 1152, 16, 28)
    assert 0.55e9 < pixart.parameters < 0.65e9
    teacher = P.measure(pixart, "teacher", 1, (512, 512))  # CFG: two rows
    assert teacher.resident == pixart.weights + pixart.bank_bytes and 0 < teacher.counted < P.GiB


def test_model_config_from_a_checkpoint_header_matches_comfyuis_detection(tmp_path):
    path = tmp_path / "tiny_sd35.safetensors"
    save_file(sd3_state_dict(depth=2, mmditx_layers=(0,)), str(path))
    detected = model_config_from_file(path)
    loaded = comfy.sd.load_diffusion_model(str(path)).model.model_config
    assert type(detected) is type(loaded)
    assert {k: v for k, v in detected.unet_config.items() if k != "dtype"} == \
           {k: v for k, v in loaded.unet_config.items() if k != "dtype"}
    (tmp_path / "notes.safetensors").write_text("not a checkpoint")
    with pytest.raises(EDiTError, match="notes.safetensors"):
        model_config_from_file(tmp_path / "notes.safetensors")
    with pytest.raises(EDiTError, match="not found"):
        model_config_from_file(tmp_path / "missing.safetensors")


def test_cli_prints_the_table_and_targets_for_a_checkpoint_file(tmp_path, capsys):
    path = tmp_path / "tiny_sd35.safetensors"
    save_file(sd3_state_dict(depth=2, mmditx_layers=(0,), pos_embed_max_size=128), str(path))  # 2048 px fits
    code = plan_cli.main(["--model", str(path), "--resolutions", "128,256", "--mode", "layerwise", "--device-memory", "8GB",
                   "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert code == 0 and "| 128 px | layerwise | 1 |" in out and "| 256 px | layerwise | 1 |" in out
    assert "layer-wise step <= 16 GiB @1024 px" in out and "PASS" in out and "teacher data <= 2 MiB" in out
    assert "time on the assumed card" in out and "- training: 500 steps" in out
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["cost"]["train_steps"] == 500 and saved["rows"][0]["step_flops"] > 0
    with pytest.raises(EDiTError, match="--utilisation in"):
        plan_cli.main(["--model", str(path), "--resolutions", "128", "--utilisation", "0"])


def test_cli_options():
    help_text = plan_cli.build_parser().format_help()
    assert "(default: 24GiB)" in help_text and "(default: sd35-medium)" in help_text
    with pytest.raises(SystemExit):
        plan_cli.build_parser().parse_args(["--batch", "2"])  # no abbreviations
    assert plan_cli.build_parser().parse_args(["--resolutions", "512", "1024,2048"]).resolutions == [[512], [1024, 2048]]
    assert P.parse_bytes("24GiB") == P.parse_bytes("24 GB") == P.parse_bytes("24") == 24 * P.GiB
    assert P.parse_bytes("8000MiB") == 8000 * 2 ** 20
    with pytest.raises(EDiTError, match="memory size"):
        P.parse_bytes("lots")
