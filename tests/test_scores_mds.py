"""Mahalanobis with input preprocessing and MDSEns against NumPy loops, and the
evaluation's streaming fit of training-set intermediates."""

import jax.numpy as jnp
import numpy as np
import pytest
from toy_models import labelled_batches, tiny_eval_model

from ood_jax import data as D
from ood_jax.evaluate.forward import ForwardPass, ModelOutputs
from ood_jax.evaluate.scoring import fit_captured, fit_scores, score_images
from ood_jax.scores import get_score, mahalanobis_score, preprocessed_mahalanobis, resolve_hparams
from ood_jax.scores.gaussian import ClassMoments

RNG = np.random.default_rng(0)


def _np_fit(x, labels, shrinkage=1e-6):
    """Class means and the regularized inverse of the ML tied covariance, float64."""
    x = np.asarray(x, np.float64)
    classes = sorted(set(labels.tolist()))
    means = np.stack([x[labels == c].mean(axis=0) for c in classes])
    centered = x - means[labels]
    cov = centered.T @ centered / len(x)
    cov += shrinkage * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return means, np.linalg.inv(cov)


def _np_score(means, precision, z):
    """``-min_c (z - mu_c)^T P (z - mu_c)`` per row, one loop per example and class."""
    return np.array([-min(float((row - m) @ precision @ (row - m)) for m in means) for row in z])


def test_streamed_class_moments_give_the_direct_fit():
    x = RNG.normal(loc=3.0, size=(60, 4))
    labels = np.arange(60) % 3
    moments = ClassMoments()
    for start in (0, 25, 41):
        stop = {0: 25, 25: 41, 41: 60}[start]
        moments.add(x[start:stop], labels[start:stop])
    test = RNG.normal(loc=3.0, size=(7, 4))
    means, precision = _np_fit(x, labels)
    got = mahalanobis_score(moments.fit(), test)
    np.testing.assert_allclose(got, _np_score(means, precision, test), rtol=1e-4)
    empty = ClassMoments()
    empty.add(x[:4], np.array([0, 0, 2, 2]))
    with pytest.raises(ValueError, match=r"none for \[1\]"):
        empty.fit()


def test_preprocessing_steps_against_the_analytic_distance_gradient():
    a = RNG.normal(size=(2 * 2 * 3, 5))
    train = RNG.normal(size=(40, 5))
    labels = np.arange(40) % 2
    means, precision = _np_fit(train, labels)
    moments = ClassMoments()
    moments.add(train, labels)
    images = RNG.normal(size=(6, 2, 2, 3)).astype(np.float32)
    std, eps = np.array([0.2, 0.5, 0.25]), 0.01
    want = []
    for image in images.astype(np.float64):
        z = image.reshape(-1) @ a
        closest = min(means, key=lambda m: (z - m) @ precision @ (z - m))
        grad = (a @ (2 * precision @ (z - closest))).reshape(image.shape)
        moved = image - eps * np.sign(grad) / std
        want.append(_np_score(means, precision, (moved.reshape(1, -1) @ a))[0])
    got = preprocessed_mahalanobis(
        moments.fit(),
        lambda x: x.reshape(x.shape[0], -1) @ jnp.asarray(a, jnp.float32),
        images,
        eps=eps,
        std=std,
    )
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _batches(images, labels):
    return labelled_batches(images, labels, 16)


def test_the_evaluation_fits_every_block_streaming_and_sums_the_layers():
    model = tiny_eval_model(width=3, image_size=8)
    forward = ForwardPass(model)
    train_x = RNG.normal(size=(45, 8, 8, 3)).astype(np.float32)
    train_y = (np.arange(45) % 3).astype(np.int32)
    test_x = RNG.normal(size=(9, 8, 8, 3)).astype(np.float32)
    names = ["mds_ensemble", "mahalanobis_odin"]
    zero = {"mds_ensemble": {"noise": 0.0}, "mahalanobis_odin": {"eps": 0.0}}
    hp = resolve_hparams(names, zero)
    fitted = fit_captured(hp, forward, lambda: _batches(train_x, train_y))
    train = forward(_batches(train_x, train_y))
    fitted.update(fit_scores(hp, train))
    assert set(fitted) == set(names)
    dataset = D.make_gaussian_noise(9, seed=1)  # stands in; the batches are given

    def score(hparams):
        return score_images(
            hparams,
            forward,
            {"set": dataset},
            batches=lambda _: _batches(test_x, -np.ones(9, np.int32)),
            std=(0.25, 0.25, 0.25),
            seed=0,
            fitted=fitted,
        )[0]["set"]

    got = score(hp)
    # Noise 0: the sum over blocks of the plain Mahalanobis score of their channel means.
    _, _, train_out = model(train_x, capture=("blocks",))
    logits, features, test_out = model(test_x, capture=("blocks",))
    want = 0.0
    for block_train, block_test in zip(train_out["blocks"], test_out["blocks"], strict=True):
        means, precision = _np_fit(np.asarray(block_train).mean(axis=(1, 2)), train_y)
        want = want + _np_score(means, precision, np.asarray(block_test).mean(axis=(1, 2)))
    np.testing.assert_allclose(got["mds_ensemble"], want, rtol=2e-3, atol=1e-3)
    means, precision = _np_fit(train.features, train_y)
    np.testing.assert_allclose(
        got["mahalanobis_odin"], _np_score(means, precision, features), rtol=2e-3
    )
    # The default step moves every input closer to its class: the score rises.
    moved = score(resolve_hparams(names))
    for name in names:
        assert (moved[name] >= got[name] - 1e-4).all(), name
    assert get_score("mds_ensemble").defaults["noise"] == 0.0014
    assert get_score("mahalanobis_odin").defaults["eps"] == 0.002
    with pytest.raises(ValueError, match="fitted statistics"):
        score_images(hp, forward, {"set": dataset}, batches=None, std=(1.0,), seed=0)
    unlabelled = ModelOutputs(train.logits, train.features, -np.ones(45, np.int32))
    with pytest.raises(ValueError, match="label -1"):
        fit_scores(hp, unlabelled)
