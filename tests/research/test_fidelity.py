"""The fidelity study's parts: the pinned image set, the latent maps, the caption encoder and
the teachers trained on it (quick setting), through ComfyUI's own model classes."""
import dataclasses
import io
import tarfile

import pytest
import torch

from research.fidelity import emoji
from research.fidelity.captions import CaptionEncoder, Vocabulary


# The share of the real images' accuracy the shipped PixArt teacher's samples must reach on 20
# held-out captions taking the categories in turn: it reaches 69% there (87% on all 197, where
# faces dominate); noise would reach about 28%. SD3's teacher does not draw yet (62% on all
# 197, 15% on these 20: docs/fidelity.md), so only its identity is checked.
DRAWS = 0.6


@pytest.fixture(scope="module")
def data():
    return emoji.load()


def test_image_set_is_the_pinned_package_with_captions_and_a_held_out_split(data):
    assert len(data) > 1800 and data.images.shape[1:] == (4, 64, 64) and data.images.dtype == torch.uint8
    assert data.source.startswith("emoji-datasource-twitter@16.0.0 sha512-")
    assert data.captions[0] == "grinning face, face smiling, smileys emotion"
    assert len(set(data.categories)) == 10
    held = int(data.held_out.sum())
    assert 0.07 * len(data) < held < 0.13 * len(data)
    train, test = data.split(False), data.split(True)
    assert not set(train.captions) & set(test.captions)
    # Premultiplied: no colour where alpha is 0; real drawings, not blank images.
    rgb, alpha = data.images[:, :3].int(), data.images[:, 3:].int()
    assert bool((rgb <= alpha).all())
    assert float(data.images[:, 3].float().mean()) > 60


def test_a_file_that_is_not_the_pinned_package_is_refused(tmp_path):
    fake = tmp_path / emoji.TARBALL
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("package/emoji.json")
        payload = b"[]"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    fake.write_bytes(buf.getvalue())
    with pytest.raises(emoji.DatasetError, match="not the pinned emoji-datasource-twitter@16.0.0"):
        emoji.load(fake)


def test_latent_maps_are_exactly_invertible(data):
    from research.fidelity.teacher import image_to_latent, latent_to_image
    x = emoji.to_unit(data.images[:5])
    for family, channels in (("sd3", 16), ("pixart", 4)):
        z = image_to_latent(family, x)
        assert z.shape == (5, channels, 64, 64)
        assert torch.equal(latent_to_image(family, z), x)


def test_vocabulary_and_caption_encoder():
    vocab = Vocabulary.build(["red apple, food", "green apple"])
    assert vocab.words[0] == "apple" and len(vocab) == 6
    ids = vocab.encode(["green apple", "", "blue apple"], 4)
    assert ids.tolist() == [[vocab.index["green"], vocab.index["apple"], 0, 0], [0] * 4, [1, vocab.index["apple"], 0, 0]]
    enc = CaptionEncoder(len(vocab), 4, 8)
    context, pooled = enc(ids)
    assert context.shape == (3, 4, 8) and pooled.shape == (3, 8)
    assert torch.equal(context[1], torch.zeros(4, 8)) and torch.equal(pooled[1], torch.zeros(8))
    assert torch.equal(context[0, 2:], torch.zeros(2, 8))


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_quick_teacher_trains_caches_and_samples(family, data, tmp_path):
    from edit_core.comfyui.model import model_spec
    from edit_core.distill.trajectories import sample
    from research.fidelity.teacher import QUICK, load_teacher, train_teacher
    config = QUICK[family]
    steps = []
    teacher = train_teacher(config, data, tmp_path, lambda s, n, loss: steps.append(loss))
    assert len(steps) == sum(n for _, n in config.schedule) == len(teacher.history)
    assert all(torch.isfinite(torch.tensor(steps)))
    files = list(tmp_path.glob(f"teacher-{family}-*.safetensors"))
    assert len(files) == 1
    spec = model_spec(teacher.patcher)
    assert spec.family == family and spec.depth == config.depth
    if family == "sd3":
        assert "joint_blocks.0.attn2" in spec.layers
    # Cached: a second call trains nothing and loads the same weights.
    again = train_teacher(config, data, tmp_path, lambda *a: pytest.fail("trained again"))
    a = teacher.patcher.model.diffusion_model.state_dict()
    b = again.patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # 64 px emoji = 32 x 32 tokens; the sample is an RGBA image in range.
    w, h = teacher.resolution(64)
    latent = sample(teacher.patcher, teacher.conditioning("grinning face"), teacher.conditioning(""), w, h, 0,
                    "euler", "simple", 2, 3.0)
    image = teacher.images(latent)
    assert image.shape == (1, 4, 64, 64) and bool(torch.isfinite(image).all())
    assert load_teacher(files[0]).vocabulary.words == teacher.vocabulary.words


def test_an_interrupted_teacher_run_resumes_to_the_same_weights(data, tmp_path, monkeypatch):
    """Killed after a training checkpoint, the run continues from it and ends where an
    uninterrupted run ends, bit for bit (weights, averaged weights, optimizer, sampling RNG)."""
    from research.fidelity import teacher as teacher_module
    from research.fidelity.teacher import QUICK, learning_rate, load_teacher, train_teacher
    config = dataclasses.replace(QUICK["pixart"], schedule=((40, 3), (64, 2)), lr_final=0.1)
    monkeypatch.setattr(teacher_module, "RESUME_EVERY", 2)
    whole = train_teacher(config, data, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_at_4(step, total, loss):
        if step == 4:
            raise Stop
    with pytest.raises(Stop):
        train_teacher(config, data, tmp_path / "cut", stop_at_4)
    (checkpoint,) = (tmp_path / "cut").glob("*.resume.safetensors")
    assert len(load_teacher(checkpoint, partial=True).history) == 4
    with pytest.raises(ValueError, match="not an emoji teacher"):
        load_teacher(checkpoint)
    steps = []
    resumed = train_teacher(config, data, tmp_path / "cut", lambda step, total, loss: steps.append(step))
    assert steps == [5]  # only the step after the checkpoint trains again
    assert not list((tmp_path / "cut").glob("*.resume.safetensors"))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    a, b = whole.patcher.model.diffusion_model.state_dict(), resumed.patcher.model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Warm-up, then cosine decay to lr_final at the last step.
    assert learning_rate(config, 0, 5) < learning_rate(config, 2, 5) and learning_rate(config, 4, 5) == pytest.approx(
        config.lr * 0.1 * min(1.0, 5 / config.warmup_steps))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_the_shipped_teacher_is_the_full_setting_and_draws_held_out_captions(family, data, tmp_path):
    """Studies and tests start from the shipped teachers: each is FULL's teacher on this data
    (a changed FULL must be retrained and shipped again), loads without training, carries the
    recorded weights, and (PixArt) draws: on held-out captions across the categories, the
    classifier names its samples' category nearly as often as the real images'."""
    from research.fidelity import shipped
    from research.fidelity.features import train_classifier
    from research.fidelity.teacher import FULL, REPRODUCE, teacher_file_name, train_teacher
    from research.fidelity.teacher_check import CheckSettings, check_teacher
    entry = shipped.entries()[f"teacher-{family}"]
    assert entry["file"] == teacher_file_name(FULL[family], data.source)
    assert entry["command"] == REPRODUCE.format(family=family)
    assert entry["bytes"] == (shipped.FOLDER / entry["file"]).stat().st_size < 64 * 2 ** 20
    teacher = train_teacher(FULL[family], data, tmp_path, lambda *a: pytest.fail("trained instead of loading"))
    assert teacher.file == shipped.FOLDER / entry["file"] and teacher.digest == entry["weights_sha256"]
    assert len(teacher.history) == sum(n for _, n in FULL[family].schedule) == entry["steps"]
    if family == "pixart":
        result = check_teacher(teacher, data, train_classifier(data, tmp_path, progress=False), CheckSettings(),
                               limit=20)
        assert result["teacher_accuracy"] >= DRAWS * result["real_accuracy"], result["teacher_accuracy"]


def test_a_changed_shipped_teacher_is_refused(data, tmp_path, monkeypatch):
    import shutil
    from safetensors import safe_open
    from edit_core.util.safetensors_io import save_safetensors
    from research.fidelity import shipped
    from research.fidelity.teacher import FULL, train_teacher
    entry = shipped.entries()["teacher-pixart"]
    changed = tmp_path / "shipped"
    changed.mkdir()
    shutil.copy(shipped.MANIFEST, changed)
    with safe_open(str(shipped.FOLDER / entry["file"]), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if k.startswith("model."))[0]
    tensors[name] = tensors[name] * 1.001
    save_safetensors(tensors, changed / entry["file"], meta)
    monkeypatch.setattr(shipped, "FOLDER", changed)
    monkeypatch.setattr(shipped, "MANIFEST", changed / "manifest.json")
    with pytest.raises(ValueError, match="weights sha256 .* is not the .* that manifest.json records"):
        train_teacher(FULL["pixart"], data, tmp_path / "work")


@pytest.mark.slow
def test_quick_study_writes_tables_and_pictures(tmp_path):
    """The whole study command in its quick setting: teachers, classifier, attention statistics,
    two student designs per family, block speed, and the report a researcher reads."""
    import json
    import subprocess
    import sys
    from PIL import Image
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "research.fidelity", "study", "--quick", "--threads", "1",
                          "--ablations", "a,b", "--work", str(tmp_path / "work"), "--out", str(out), "--speed-px", "384"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    text = (out / "study.md").read_text()
    for family in ("sd3", "pixart"):
        assert f"## {family}: student designs" in text
        assert f"| trained {family} |" in text and f"| synthetic {family} |" in text
        record = json.loads((out / f"{family}.json").read_text())
        assert set(record["ablations"]) == {"a", "b"}
        assert record["ablations"]["b"]["hparams"] == {"local_kernel": 0}
        assert record["speed_px"] == 384 and set(record["speed"]) == {"a", "b", "d"}  # d: the default's speed-up
        # The equal-speed baselines ran at the default design's measured speed-up.
        speedup = record["baselines_speedup"]
        assert speedup == record["speed"]["d"] > 0
        fewer, cache = record["baselines"]["fewer_steps"], record["baselines"]["lazycache"]
        assert 1 <= fewer["steps"] <= 2 and fewer["speedup"] == 2 / fewer["steps"]
        assert 0 < cache["calls_share"] <= 1 and cache["speedup"] == pytest.approx(1 / cache["calls_share"])
        for r in (fewer, cache):
            assert set(r["image_error"]) == set(r["fd_student_real"]) == {"40", "64"}
        assert f"Equal speed ({family})" in text
        # The teacher's own sensitivity: bfloat16 moves its samples, but far less than noise would.
        sensitivity = record["teacher"]["sensitivity"]
        assert set(sensitivity) == {"bfloat16", "one step fewer"}
        assert all(0 < sensitivity["bfloat16"][px] < 0.5 for px in ("40", "64"))
        for px in ("40", "64"):
            assert record["teacher"]["fd_teacher_real"][px] > 0
            grid = Image.open(out / f"{family}_samples_{px}px.png").convert("L")
            lo, hi = grid.getextrema()
            assert hi - lo > 100  # real emoji beside the samples: not a blank picture
    assert "| (a) previous default (k/v compressed) |" in text and "| (b) no local branch |" in text
    assert Image.open(out / "teacher_loss.png").size[0] > 300


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_teacher_start_zeroes_only_the_modulations_and_output(family):
    """adaLN-zero start: every block is the identity through its zero modulation, while its
    own weights are random (a substring match once zeroed SD3's 'joint_blocks' whole)."""
    from research.fidelity.teacher import QUICK, build_base_model, init_weights_
    _, base = build_base_model(QUICK[family])
    init_weights_(base.diffusion_model, 0)
    for name, p in base.diffusion_model.named_parameters():
        zero_start = "adaLN_modulation" in name.split(".") or name.startswith(("final_layer.linear.", "t_block."))
        if zero_start:
            assert not p.any(), name
        elif p.ndim >= 2:
            assert p.abs().min() >= 0 and p.std() > 0, name
