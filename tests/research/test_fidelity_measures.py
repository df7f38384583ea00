"""The fidelity study's measures: the emoji classifier and its Fréchet distance, and the
attention statistics of a teacher's own softmax attention."""
import dataclasses
import json
import math

import pytest
import torch

from edit_core.fixtures import tiny_models
from edit_core.bank import EDiTError
from edit_core.comfyui.model import conditioning_dims
from research.fidelity import attention_stats as stats
from research.fidelity import emoji, features


def gaussian_closed_form(mu_a, var_a, mu_b, var_b):
    """Fréchet distance of Gaussians with diagonal covariances: |dmu|^2 + sum (sqrt(a) - sqrt(b))^2."""
    return float((mu_a - mu_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())


def with_moments(n, mean, var):
    """n samples whose sample mean and unbiased covariance are exactly ``mean`` and diag(``var``)."""
    x = torch.randn(n, len(mean), dtype=torch.float64)
    x = x - x.mean(0)
    w, v = torch.linalg.eigh(torch.cov(x.T))
    x = x @ (v / w.sqrt()) @ v.T  # whitened: sample covariance = identity
    return x * var.sqrt() + mean


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    d = 12
    mu_a, mu_b = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    var_a, var_b = torch.rand(d, dtype=torch.float64) * 3 + 0.1, torch.rand(d, dtype=torch.float64) * 3 + 0.1
    expected = gaussian_closed_form(mu_a, var_a, mu_b, var_b)
    assert features.gaussian_frechet_distance(mu_a, var_a.diag(), mu_b, var_b.diag()) == pytest.approx(expected,
                                                                                                      rel=1e-10)
    # A rotation of both (full covariances) leaves the distance unchanged.
    rot, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    rotated = features.gaussian_frechet_distance(rot @ mu_a, rot @ var_a.diag() @ rot.T, rot @ mu_b,
                                                 rot @ var_b.diag() @ rot.T)
    assert rotated == pytest.approx(expected, rel=1e-9)
    # From samples with exactly these moments, float32 features included.
    a, b = with_moments(200, mu_a, var_a), with_moments(150, mu_b, var_b)
    assert features.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert features.frechet_distance(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)


def test_frechet_distance_is_symmetric_zero_for_identical_sets_and_checks_its_input():
    a = torch.randn(300, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    b = torch.randn(250, 16, dtype=torch.float64) * 2 + 1
    ab, ba = features.frechet_distance(a, b), features.frechet_distance(b, a)
    assert ab > 1 and ab == pytest.approx(ba, rel=1e-9)
    assert abs(features.frechet_distance(a, a.clone())) < 1e-8 * float(torch.cov(a.T).trace())
    # Fewer samples than dimensions: singular covariances still give a finite, non-negative distance.
    few = features.frechet_distance(a[:5], b[:7])
    assert math.isfinite(few) and few > 0
    with pytest.raises(EDiTError, match="feature widths differ"):
        features.frechet_distance(a, b[:, :8])
    with pytest.raises(EDiTError, match="N >= 2"):
        features.frechet_distance(a[:1], b)


@pytest.fixture(scope="module")
def emoji_set():
    return emoji.load()


def test_quick_classifier_beats_chance_on_held_out_emoji_and_is_cached_by_fingerprint(emoji_set, tmp_path):
    c = features.train(emoji_set, features.QUICK)
    print(f"quick classifier: held-out accuracy {c.held_out_accuracy}, chance {c.chance:.3f}, "
          f"{c.train_seconds:.1f} s")
    assert c.train_seconds < 20
    assert c.chance < 0.25 and len(c.classes) == 10
    assert c.held_out_accuracy["32"] > c.chance + 0.15, c.held_out_accuracy
    assert c.held_out_accuracy["48"] > c.chance + 0.10 and c.held_out_accuracy["64"] > c.chance + 0.10, \
        c.held_out_accuracy

    held = emoji_set.split(True)
    for size in (32, 48, 64):
        f = c.features(emoji.to_unit(held.images[:40], size))
        assert f.shape == (40, features.QUICK.widths[-1]) and f.dtype == torch.float64 and f.isfinite().all()
    with pytest.raises(EDiTError, match="emoji.to_unit"):
        c.features(held.images[:4, :3].float())
    with pytest.raises(EDiTError, match="uint8"):
        c.features(held.images[:4])

    features.save(c, tmp_path)
    weights, meta = features.cache_paths(tmp_path, c.fingerprint)
    assert json.loads(meta.read_text())["held_out_accuracy"] == c.held_out_accuracy
    back = features.train_classifier(emoji_set, tmp_path, quick=True)  # from the cache: no training
    x = emoji.to_unit(held.images[:16], 32)
    assert torch.equal(back.features(x), c.features(x)) and back.train_seconds == c.train_seconds
    # Other settings or another data source: another fingerprint, not this file.
    assert features.load(tmp_path, features.DEFAULT, emoji_set.source) is None
    assert features.load(tmp_path, features.QUICK, emoji_set.source + " other") is None
    record = json.loads(meta.read_text())
    meta.write_text(json.dumps(dict(record, fingerprint="0" * 16)))
    with pytest.raises(EDiTError, match="fingerprint '0000"):
        features.load(tmp_path, features.QUICK, emoji_set.source)
    meta.write_text(json.dumps(record))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(EDiTError, match="truncated"):
        features.load(tmp_path, features.QUICK, emoji_set.source)


def logits_as_qk(logits: torch.Tensor):
    """q, k with q k^T / sqrt(d) == logits (d = N): k = sqrt(N) I."""
    n = logits.shape[-1]
    return logits.double(), (math.sqrt(n) * torch.eye(n, dtype=torch.float64)).expand_as(logits)


def test_attention_rows_of_peaked_and_uniform_attention():
    grid = (5, 6)
    n = grid[0] * grid[1]
    # Peaked on the query itself: all mass local, entropy ~0.
    q, k = logits_as_qk(torch.eye(n) * 60)
    entropy, local = stats.attention_rows(q, k, grid)
    assert entropy.max() < 1e-20 and (local - 1).abs().max() < 1e-20
    # Same with q = k (identity-like self-similarity) and heads / batch dims.
    x = 40 * torch.eye(n, 48)[None, None].repeat(2, 3, 1, 1)
    summary = stats.attention_summary(x, x, grid)
    assert summary["entropy"] < 1e-3 and summary["local_mass"] > 0.999
    # Chunked over (batch, head) rows: the same rows however small the chunks.
    y = torch.randn(2, 3, n, 16)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-13) for a, b in zip(stats.attention_rows(y, y.flip(-1), grid),
                                                  stats.attention_rows(y, y.flip(-1), grid, max_elements=1)))
    # All-equal logits: entropy 1, mass = |neighbourhood| / N (9 inside, 6 on an edge, 4 in a corner).
    entropy, local = stats.attention_rows(*logits_as_qk(torch.full((n, n), 3.7)), grid)
    assert (entropy - 1).abs().max() < 1e-12
    local = local.reshape(grid)
    assert (local[1:-1, 1:-1] - 9 / n).abs().max() < 1e-14
    assert (local[0, 1:-1] - 6 / n).abs().max() < 1e-14 and (local[1:-1, -1] - 6 / n).abs().max() < 1e-14
    assert (local[[0, 0, -1, -1], [0, -1, 0, -1]] - 4 / n).abs().max() < 1e-14


def test_attention_rows_of_attention_just_outside_the_neighbourhood_and_on_two_keys():
    grid = (4, 7)
    n = grid[0] * grid[1]
    r, c = torch.arange(n) // grid[1], torch.arange(n) % grid[1]
    two_right = ((r[:, None] == r[None]) & (c[None] == (c[:, None] + 2) % grid[1])).double()  # 2 columns over
    entropy, local = stats.attention_rows(*logits_as_qk(two_right * 80), grid)
    assert local.max() < 1e-20 and entropy.max() < 1e-20
    # Half on the query, half on a key 2 columns over: mass 1/2, entropy log 2 / log N.
    entropy, local = stats.attention_rows(*logits_as_qk((two_right + torch.eye(n)) * 80), grid)
    assert (local - 0.5).abs().max() < 1e-12 and (entropy - math.log(2) / math.log(n)).abs().max() < 1e-12
    with pytest.raises(EDiTError, match="token grid"):
        stats.attention_rows(torch.randn(1, n + 1, 8), torch.randn(1, n + 1, 8), grid)


def test_synthetic_teachers_statistics_per_layer():
    measured = stats.synthetic_teachers(steps=2)
    print("\n" + stats.markdown_table(measured))
    assert list(measured["sd3"]) == ["joint_blocks.0.attn", "joint_blocks.0.attn2", "joint_blocks.1.attn"]
    assert list(measured["pixart"]) == ["blocks.0.attn", "blocks.1.attn"]
    for family, layers in measured.items():
        sd3 = family == "sd3"
        grid = (256 // 16) ** 2 if sd3 else (384 // 16) ** 2
        for name, v in layers.items():
            assert 0 < v["entropy"] < 1 and 9 / grid < v["local_mass"] < 1, (family, name, v)
        # Local by construction: far more than uniform attention's mass in the 3x3 neighbourhood.
        assert max(v["local_mass"] for v in layers.values()) > 20 * 9 / grid, (family, layers)
    # A 20 x 12 token grid (row-major, width first in the resolution): read the wrong way round,
    # the neighbourhoods would miss and the mass would drop.
    model = tiny_models.sd3_patcher(seed=1, attention_gain=4.0, local_attention=True)
    cond = lambda text: tiny_models.random_conditioning(text, 0, 24, *conditioning_dims(model))  # noqa: E731
    wide = stats.attention_stats(model, cond("attention probe"), cond(""), (320, 192), steps=2)
    for name, v in wide.items():
        assert abs(v["local_mass"] - measured["sd3"][name]["local_mass"]) < 0.03, (name, v, measured["sd3"][name])


def test_classifier_training_is_seeded(emoji_set):
    short = dataclasses.replace(features.QUICK, epochs=1)
    a, b = features.train(emoji_set, short), features.train(emoji_set, short)
    x = emoji.to_unit(emoji_set.images[:32], 32)
    assert torch.equal(a.features(x), b.features(x)) and a.history == b.history
    other = features.train(emoji_set, dataclasses.replace(short, seed=1))
    assert not torch.equal(other.features(x), a.features(x))


def test_the_shipped_classifier_loads_without_training_and_a_changed_copy_is_refused(emoji_set, tmp_path, monkeypatch):
    """The study starts from the classifier the pack ships, checked against the weights digest
    its manifest records; a copy whose weights changed is refused with what to do."""
    import shutil
    from research.fidelity import shipped
    entry = shipped.entries()["classifier"]
    monkeypatch.setattr(features, "train", lambda *a, **k: pytest.fail("trained instead of loading the shipped one"))
    c = features.train_classifier(emoji_set, tmp_path / "empty-cache", progress=False)
    assert shipped.weights_digest(c.model.state_dict()) == entry["weights_sha256"]
    assert c.held_out_accuracy == entry["held_out_accuracy"] and c.held_out_accuracy["64"] > 2 * c.chance
    # A copy of the shipped folder with one weight changed.
    changed = tmp_path / "shipped"
    shutil.copytree(shipped.FOLDER, changed, ignore=shutil.ignore_patterns("teacher-*"))
    monkeypatch.setattr(shipped, "FOLDER", changed)
    monkeypatch.setattr(shipped, "MANIFEST", changed / "manifest.json")
    path = changed / entry["file"]
    state = dict(c.model.state_dict())
    name = sorted(state)[0]
    state[name] = state[name] + 1e-3
    from safetensors import safe_open
    from edit_core.util.safetensors_io import save_safetensors
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_safetensors(state, path, meta)
    with pytest.raises(EDiTError, match="is not the .* that manifest.json records"):
        features.train_classifier(emoji_set, tmp_path / "empty-cache-2", progress=False)
