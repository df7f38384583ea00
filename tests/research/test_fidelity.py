"""The fidelity study's parts: the pinned image set, the latent maps, the caption encoder and
the teachers trained on it (quick setting), through ComfyUI's own model classes."""
import io
import tarfile

import pytest
import torch

from research.fidelity import emoji
from research.fidelity.captions import CaptionEncoder, Vocabulary


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
        assert record["speed_px"] == 384 and set(record["speed"]) == {"a", "b"}
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
