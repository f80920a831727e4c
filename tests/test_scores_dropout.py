"""MC dropout against loops over the passes, and the evaluation's dropout-on passes."""

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import softmax
from toy_models import tiny_eval_model

from ood_jax import data as D
from ood_jax import rng as rng_lib
from ood_jax.evaluate.forward import ForwardPass
from ood_jax.evaluate.scoring import score_images
from ood_jax.scores import get_score, mc_dropout, resolve_hparams

RNG = np.random.default_rng(0)
X = RNG.normal(size=(6, 5)).astype(np.float32)
W = RNG.normal(size=(5, 4)).astype(np.float32)
SET = D.make_gaussian_noise(7, seed=1)  # stands in for a dataset; the batches are given


def _toy_dropout(x, key):
    """Logits of ``x`` with half of its entries dropped (mask drawn from ``key``)."""
    keep = jax.random.bernoulli(jax.random.wrap_key_data(key), 0.5, x.shape)
    return (x * keep * 2.0) @ W


@pytest.mark.parametrize("mode", ["mean", "var"])
def test_mc_dropout_aggregates_the_softmax_of_every_pass(mode):
    key, samples = rng_lib.root_key(3), 7
    passes = np.stack(
        [
            softmax(np.asarray(_toy_dropout(X, rng_lib.step_key(key, s)), np.float64), axis=-1)
            for s in range(samples)
        ]
    )
    want = []
    for b in range(X.shape[0]):
        per_class = [passes[:, b, k] for k in range(W.shape[1])]
        if mode == "mean":
            want.append(max(sum(p) / samples for p in per_class))
        else:
            variances = [sum((v - p.mean()) ** 2 for v in p) / (samples - 1) for p in per_class]
            want.append(-sum(variances) / len(variances))
    got = mc_dropout(_toy_dropout, X, key, samples=samples, mode=mode)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        mc_dropout(_toy_dropout, X, key, samples=2, mode="max")


def _tiny(dropout_rate):
    return tiny_eval_model(width=4, image_size=8, dropout_rate=dropout_rate)


def _eager_mc_dropout(model, batches, *, seed, samples):
    """Per batch and pass: the model with dropout on, run eagerly on its own copy."""
    graphdef, state = nnx.split(model)
    root, scores = rng_lib.root_key(seed), []
    for index, batch in enumerate(batches):
        batch_key = rng_lib.step_key(root, index)
        probs = []
        for s in range(samples):
            copy = nnx.merge(graphdef, rng_lib.reseeded(state, rng_lib.step_key(batch_key, s)))
            for _, module in nnx.iter_modules(copy):
                if isinstance(module, nnx.Dropout):
                    module.deterministic = False
            probs.append(softmax(np.asarray(copy(batch["image"])[0], np.float64), axis=-1))
        scores.append(np.mean(probs, axis=0).max(axis=-1)[batch["mask"]])
    return np.concatenate(scores)


def test_the_evaluation_runs_seeded_dropout_passes_with_batchnorm_in_eval_mode():
    model = _tiny(0.5)
    x = RNG.normal(size=(7, 8, 8, 3)).astype(np.float32)
    data = [
        {"image": x[:4], "mask": np.ones(4, bool)},
        {"image": x[4:], "mask": np.array([True, False, True])},
    ]
    hp = resolve_hparams(["mc_dropout"], {"mc_dropout": {"samples": 5}})
    forward = ForwardPass(model)
    got, sizes = score_images(
        hp, forward, {"set": SET}, batches=lambda _: iter(data), std=(1.0,), seed=0
    )
    want = _eager_mc_dropout(model, data, seed=0, samples=5)
    np.testing.assert_allclose(got["set"]["mc_dropout"], want, rtol=1e-5, atol=1e-6)
    # The passes differ from the eval-mode model, and another seed gives other masks.
    eval_msp = softmax(np.asarray(model(x)[0], np.float64), axis=-1).max(axis=-1)
    assert not np.allclose(want, eval_msp[[0, 1, 2, 3, 4, 6]], atol=1e-4)
    other = resolve_hparams(["mc_dropout"], {"mc_dropout": {"samples": 5, "seed": 1}})
    again, _ = score_images(
        other, forward, {"set": SET}, batches=lambda _: iter(data), std=(1.0,), seed=0
    )
    assert not np.allclose(again["set"]["mc_dropout"], want)
    assert get_score("mc_dropout").defaults["samples"] == 30


def test_a_model_without_dropout_skips_the_score_with_a_warning():
    forward = ForwardPass(_tiny(0.0))
    hp = resolve_hparams(["mc_dropout"])
    data = [{"image": np.zeros((2, 8, 8, 3), np.float32)}]
    with pytest.warns(UserWarning, match="dropout_rate"):
        got, sizes = score_images(
            hp, forward, {"set": SET}, batches=lambda _: iter(data), std=(1.0,), seed=0
        )
    assert got == {"set": {}} and sizes == {}
    with pytest.raises(ValueError, match="no dropout layer"):
        forward.map_stochastic(lambda apply, images, key: images[:, 0, 0, 0], data, seed=0)
