"""ASH-P/B/S, SCALE and RankFeat against NumPy loops written from the papers' formulas,
and the evaluation's extra forward pass that only activation scores trigger."""

import numpy as np
import pytest
from flax import nnx
from scipy.special import logsumexp

from ood_jax import data as D
from ood_jax.evaluate import EvalSpec, run_evaluation
from ood_jax.evaluate.forward import ForwardPass
from ood_jax.evaluate.scoring import score_activations
from ood_jax.models import create_model
from ood_jax.scores import Head, get_score, rank1_removed, resolve_hparams
from ood_jax.scores import shaping as S
from ood_jax.scores.registry import compute


def _kept(row, percentile):
    """Indices of the k = n - round(n p / 100) largest entries (ties: lower index first)."""
    n = row.size
    k = n - int(np.round(n * percentile / 100.0))
    order = sorted(range(n), key=lambda i: (-row[i], i))
    return order[:k]


def np_shape(x, variant, percentile):
    """The shaping of each example of ``x [B, ...]``, one loop per example."""
    out = np.zeros(x.shape, np.float64)
    for b in range(x.shape[0]):
        row = x[b].reshape(-1).astype(np.float64)
        kept = _kept(row, percentile)
        s1 = row.sum()
        pruned = np.zeros_like(row)
        pruned[kept] = row[kept]
        s2 = pruned.sum()
        if variant == "ash_p":
            new = pruned
        elif variant == "ash_b":
            new = np.zeros_like(row)
            new[kept] = s1 / len(kept)
        elif variant == "ash_s":
            new = pruned * np.exp(s1 / s2)
        else:  # scale
            new = row * np.exp(s1 / s2)
        out[b] = new.reshape(x.shape[1:])
    return out


def _relu_features(rng, shape):
    """Post-ReLU-like activations: positive values and exact zeros (ties)."""
    return np.maximum(rng.normal(size=shape), 0.0).astype(np.float32) + 0.1 * (
        rng.random(shape) < 0.5
    ).astype(np.float32)


@pytest.mark.parametrize("variant", list(S.SHAPINGS))
@pytest.mark.parametrize("percentile", [0.0, 65.0, 90.0, 97.0])
def test_shapings_match_numpy_loops(variant, percentile):
    rng = np.random.default_rng(0)
    for shape in [(5, 20), (3, 4, 4, 6)]:
        x = _relu_features(rng, shape)
        got = np.asarray(S.SHAPINGS[variant](x, percentile=percentile))
        np.testing.assert_allclose(got, np_shape(x, variant, percentile), rtol=2e-5, atol=1e-6)


def test_kept_count_follows_numpys_rounding():
    # n = 10, p = 65: n * p / 100 = 6.5 rounds half to even (6): 4 kept, as int(np.round()).
    x = np.arange(10, dtype=np.float32)[None] + 1
    assert int(S.top_mask(x, 65.0).sum()) == 4
    assert int(S.top_mask(x, 75.0).sum()) == 2  # 7.5 -> 8


def _head(rng, d, k):
    return Head(rng.normal(size=(d, k)).astype(np.float32), rng.normal(size=k).astype(np.float32))


@pytest.mark.parametrize("variant", list(S.SHAPINGS))
def test_feature_scores_are_the_energy_of_the_shaped_features_and_sweep(variant):
    rng = np.random.default_rng(1)
    features = _relu_features(rng, (7, 16))
    head = _head(rng, 16, 4)
    logits = features @ head.kernel + head.bias
    score = get_score(variant)
    hp = resolve_hparams([variant], {variant: {"percentile": [score.defaults["percentile"], 50]}})
    got = compute(score, hp[variant], logits, features, head)
    for p, key in [(score.defaults["percentile"], variant), (50.0, f"{variant}_p50")]:
        shaped = np_shape(features, variant, p)
        want = logsumexp(shaped @ head.kernel + head.bias, axis=-1)
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["ash_s", "scale"])
def test_an_all_zero_feature_vector_scores_the_energy_of_the_bias(variant):
    # 0 / 0 in s1 / s2 (the references give NaN): the shaped vector stays zero, so the
    # score is logsumexp(bias), as for any finite factor; the other rows are unchanged.
    rng = np.random.default_rng(3)
    features = _relu_features(rng, (4, 16))
    features[2] = 0.0
    head = _head(rng, 16, 4)
    score = get_score(variant)
    hp = resolve_hparams([variant], {})
    got = compute(score, hp[variant], features @ head.kernel + head.bias, features, head)[variant]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[2], logsumexp(head.bias), rtol=1e-6)
    keep = [0, 1, 3]
    shaped = np_shape(features[keep], variant, score.defaults["percentile"])
    want = logsumexp(shaped @ head.kernel + head.bias, axis=-1)
    np.testing.assert_allclose(got[keep], want, rtol=1e-5, atol=1e-5)


def test_reference_defaults():
    assert get_score("ash_b").defaults == {"percentile": 90.0}  # OpenOOD ash.yml
    assert get_score("scale").defaults == {"percentile": 85.0}  # OpenOOD scale.yml
    assert get_score("ash_s").defaults == {"percentile": 65.0}  # pytorch-ood ASH
    assert get_score("rankfeat").defaults == {"temperature": 1.0}
    assert get_score("rankfeat_fused").defaults == {"temperature": 1.0}


def test_rank1_removed_matches_numpy_svd():
    x = np.random.default_rng(2).normal(size=(3, 4, 5, 6)).astype(np.float32)
    got = np.asarray(rank1_removed(x))
    for b in range(3):
        m = x[b].reshape(20, 6).astype(np.float64)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        want = m - s[0] * np.outer(u[:, 0], vt[0])
        np.testing.assert_allclose(got[b].reshape(20, 6), want, atol=1e-4)  # float32 SVD
        # Removing the top singular direction leaves the rest of the spectrum.
        np.testing.assert_allclose(np.linalg.svd(want, compute_uv=False)[:5], s[1:], atol=1e-4)


def _tiny():
    model = create_model("tiny", num_classes=3, rngs=nnx.Rngs(0), width=4)
    model(np.random.default_rng(5).normal(size=(8, 8, 8, 3)).astype(np.float32))
    model.eval()
    return model


def _np_map_logits(model, pre_pool):
    pooled = np.asarray(pre_pool, np.float64).mean(axis=(1, 2))
    return pooled @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])


def test_map_scores_and_rankfeat_through_the_forward_pass():
    model = _tiny()
    x = np.random.default_rng(3).normal(size=(10, 8, 8, 3)).astype(np.float32)
    _, _, out = model(x, capture=("pre_pool",))
    pre_pool = np.asarray(out["pre_pool"])
    names = ["ash_p_map", "ash_b_map", "ash_s_map", "scale_map", "rankfeat"]
    hp = resolve_hparams(names, {"ash_s_map": {"percentile": [65.0, 80.0]}})

    def batches(_):
        yield {"image": x[:6], "mask": np.ones(6, bool)}
        yield {"image": x[6:], "mask": np.array([True, True, False, True])}

    got = score_activations(hp, ForwardPass(model), {"set": None}, batches=batches)["set"]
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 9])
    assert sorted(got) == sorted([*names, "ash_s_map_p80"])
    for key, variant, p in [
        ("ash_p_map", "ash_p", 65.0),
        ("ash_b_map", "ash_b", 90.0),
        ("ash_s_map", "ash_s", 65.0),
        ("ash_s_map_p80", "ash_s", 80.0),
        ("scale_map", "scale", 85.0),
    ]:
        want = logsumexp(_np_map_logits(model, np_shape(pre_pool, variant, p)), axis=-1)
        np.testing.assert_allclose(got[key], want[rows], rtol=1e-4, atol=1e-4)
    removed = []
    for m in pre_pool.astype(np.float64):
        flat = m.reshape(-1, m.shape[-1])
        u, s, vt = np.linalg.svd(flat, full_matrices=False)
        removed.append((flat - s[0] * np.outer(u[:, 0], vt[0])).reshape(m.shape))
    want = logsumexp(_np_map_logits(model, np.stack(removed)), axis=-1)
    np.testing.assert_allclose(got["rankfeat"], want[rows], rtol=1e-4, atol=1e-4)


def _np_rank1_removed(maps):
    """Each ``[H, W, C]`` map minus ``s_1 u_1 v_1^T`` of its ``[H*W, C]`` matrix (float64 SVD)."""
    removed = []
    for m in np.asarray(maps, np.float64):
        flat = m.reshape(-1, m.shape[-1])
        u, s, vt = np.linalg.svd(flat, full_matrices=False)
        removed.append((flat - s[0] * np.outer(u[:, 0], vt[0])).reshape(m.shape))
    return np.stack(removed)


def test_rankfeat_fused_averages_the_block4_and_block3_paths():
    model = _tiny()
    x = np.random.default_rng(4).normal(size=(5, 8, 8, 3)).astype(np.float32)
    _, _, out = model(x, capture=("pre_pool", "blocks"))
    block4 = _np_map_logits(model, _np_rank1_removed(out["pre_pool"]))
    # The tiny model's block before the last is its first stage; its second stage by hand.
    edited = _np_rank1_removed(out["blocks"][0]).astype(np.float32)
    rerun = np.asarray(model.act(model.bn2(model.conv2(edited))))
    block3 = _np_map_logits(model, rerun)
    want = logsumexp((block4 + block3) / 2, axis=-1)
    hp = resolve_hparams(["rankfeat_fused", "rankfeat"])

    def batches(_):
        yield {"image": x, "mask": np.ones(5, bool)}

    got = score_activations(hp, ForwardPass(model), {"set": None}, batches=batches)["set"]
    np.testing.assert_allclose(got["rankfeat_fused"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["rankfeat"], logsumexp(block4, axis=-1), rtol=1e-4, atol=1e-4)
    # An identity edit of any block gives the ordinary logits.
    for index in (0, 1):
        same = model.logits_with_block_edit(x, index, lambda a: a)
        np.testing.assert_allclose(same, model(x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="2 blocks"):
        model.logits_with_block_edit(x, 2, lambda a: a)


def _count_passes(monkeypatch):
    calls = {"plain": 0, "captured": 0, "traced_captures": []}
    plain, captured = ForwardPass.__call__, ForwardPass.map_captured
    call = type(_tiny()).__call__

    def count_plain(self, batches):
        calls["plain"] += 1
        return plain(self, batches)

    def count_captured(self, fn, capture, batches):
        calls["captured"] += 1
        return captured(self, fn, capture, batches)

    def traced(self, images, **kwargs):
        calls["traced_captures"].append(kwargs.get("capture", ()))
        return call(self, images, **kwargs)

    monkeypatch.setattr(ForwardPass, "__call__", count_plain)
    monkeypatch.setattr(ForwardPass, "map_captured", count_captured)
    monkeypatch.setattr(type(_tiny()), "__call__", traced)
    return calls


def _evaluate(scores):
    id_test = D.make_gaussian_noise(20, seed=1)
    id_test = D.from_arrays(id_test.images, np.arange(20) % 3, name="id", num_classes=3)
    ood = {"blobs": D.make_blobs(12, seed=2)}
    spec = EvalSpec(scores=scores, num_draws=1, batch_size=16, plot_scores=[])
    return run_evaluation(_tiny(), spec, id_test=id_test, ood_sets=ood)


def test_ordinary_evaluation_is_one_plain_pass_without_intermediates(monkeypatch):
    calls = _count_passes(monkeypatch)
    _evaluate(["msp", "energy", "ash_b", "scale"])
    assert calls["plain"] == 2 and calls["captured"] == 0  # one pass per dataset
    assert all(c == () for c in calls["traced_captures"])


def test_an_activation_score_adds_one_capturing_pass_per_dataset(monkeypatch):
    calls = _count_passes(monkeypatch)
    results = _evaluate(["msp", "ash_s_map", "rankfeat"])
    assert calls["plain"] == 2 and calls["captured"] == 2
    assert ("pre_pool",) in calls["traced_captures"]
    metrics = results["ood"]
    assert all({"ash_s_map", "rankfeat"} <= set(p["metrics"]) for p in metrics.values())
