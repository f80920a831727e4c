"""Gram-matrix deviations against NumPy loops over the Gram matrices, the evaluation's
streaming fit on the training set's block outputs, and the model detectors end to end."""

import numpy as np
import pytest
from scipy.special import softmax
from toy_models import labelled_batches, tiny_eval_model

from ood_jax import data as D
from ood_jax.evaluate import EvalSpec, run_evaluation
from ood_jax.evaluate.forward import ForwardPass
from ood_jax.evaluate.scoring import fit_captured, score_activations
from ood_jax.scores import get_score, gram_vectors, resolve_hparams

RNG = np.random.default_rng(0)


def _np_gram_vector(x, p):
    """Row sums of the full ``p``-th order Gram matrix of each ``[H, W, C]`` example."""
    out = []
    for example in np.asarray(x, np.float64):
        f = example.reshape(-1, example.shape[-1]) ** p
        gram = np.array([[f[:, i] @ f[:, j] for j in range(f.shape[1])] for i in range(f.shape[1])])
        rows = gram.sum(axis=1)
        out.append(np.sign(rows) * np.abs(rows) ** (1.0 / p))
    return np.stack(out)


def _np_deviation(g, lo, hi):
    return sum(
        max(lo[i] - g[i], 0) / abs(lo[i] + 1e-6) + max(g[i] - hi[i], 0) / abs(hi[i] + 1e-6)
        for i in range(len(g))
    )


@pytest.mark.parametrize("p", [1, 2, 3])
def test_gram_vectors_are_the_row_sums_of_the_gram_matrix(p):
    x = RNG.normal(size=(3, 2, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(gram_vectors(x, p), _np_gram_vector(x, p), rtol=1e-4, atol=1e-5)


def _tiny():
    return tiny_eval_model(width=2, image_size=6)


def _batches(images, labels):
    return labelled_batches(images, labels, 10)


def test_the_gram_score_from_streamed_per_class_bounds_and_held_out_norms():
    model = _tiny()
    forward = ForwardPass(model)
    powers, holdout, seed = (1, 2), 0.3, 4
    train_x = RNG.normal(size=(30, 6, 6, 3)).astype(np.float32)
    train_y = (np.arange(30) % 3).astype(np.int32)
    test_x = RNG.normal(scale=2.0, size=(7, 6, 6, 3)).astype(np.float32)
    hp = resolve_hparams(["gram"], {"gram": {"powers": powers, "holdout": holdout, "seed": seed}})
    fitted = fit_captured(hp, forward, lambda: _batches(train_x, train_y))

    def batches(_):
        return _batches(test_x, -np.ones(7, np.int32))

    got = score_activations(hp, forward, {"set": None}, batches=batches, fitted=fitted)
    # The reference: which examples are held out follows the documented seeded stream.
    draw = np.random.default_rng(seed)
    held = np.concatenate([draw.random(10) < holdout for _ in range(3)])
    _, _, train_out = model(train_x, capture=("blocks",))
    logits, _, test_out = model(test_x, capture=("blocks",))
    pred = np.argmax(np.asarray(logits), axis=-1)
    total = np.zeros(7)
    for block_train, block_test in zip(train_out["blocks"], test_out["blocks"], strict=True):
        g_train = {p: _np_gram_vector(block_train, p) for p in powers}
        g_test = {p: _np_gram_vector(block_test, p) for p in powers}
        bounds = {
            (c, p): (
                g_train[p][~held & (train_y == c)].min(0),
                g_train[p][~held & (train_y == c)].max(0),
            )
            for c in range(3)
            for p in powers
        }
        norm = np.mean(
            [
                sum(_np_deviation(g_train[p][i], *bounds[train_y[i], p]) for p in powers)
                for i in np.flatnonzero(held)
            ]
        )
        for b in range(7):
            total[b] += sum(_np_deviation(g_test[p][b], *bounds[pred[b], p]) for p in powers) / norm
    want = -total / softmax(np.asarray(logits, np.float64), axis=-1).max(axis=-1)
    np.testing.assert_allclose(got["set"]["gram"], want, rtol=2e-4, atol=1e-6)
    assert get_score("gram").defaults["powers"] == (1, 2, 3, 4, 5)


def test_a_class_without_training_examples_is_an_error():
    forward = ForwardPass(_tiny())
    x = RNG.normal(size=(6, 6, 6, 3)).astype(np.float32)
    hp = resolve_hparams(["gram"], {"gram": {"holdout": 0.0}})
    with pytest.raises(ValueError, match=r"none for \[1\]"):
        fit_captured(hp, forward, lambda: _batches(x, np.array([0, 0, 2, 2, 0, 2], np.int32)))


def test_run_evaluation_fits_and_scores_the_model_detectors_end_to_end():
    model = tiny_eval_model(width=2, image_size=8, dropout_rate=0.3)
    id_test = D.make_gaussian_noise(20, seed=1)
    id_test = D.from_arrays(id_test.images, np.arange(20) % 3, name="id", num_classes=3)
    train = D.from_arrays(
        D.make_blobs(30, seed=3).images, np.arange(30) % 3, name="train", num_classes=3
    )
    names = ["msp", "gram", "mds_ensemble", "mahalanobis_odin", "mc_dropout", "rankfeat_fused"]
    spec = EvalSpec(
        scores=names,
        score_hparams={"mc_dropout": {"samples": 2}},
        num_draws=1,
        batch_size=16,
        plot_scores=[],
    )
    assert set(spec.fitted_scores) == {"gram", "mds_ensemble", "mahalanobis_odin"}
    ood = {"blobs": D.make_blobs(12, seed=2)}
    results = run_evaluation(model, spec, id_test=id_test, ood_sets=ood, train=train)
    assert results["scores"][0] == "msp" and set(results["scores"]) == set(names)
    for protocol in results["ood"].values():
        for name in names:
            assert np.isfinite(protocol["metrics"][name]["blobs"]["auroc"]["mean"]), name
    with pytest.raises(ValueError, match="train="):
        run_evaluation(model, spec, id_test=id_test, ood_sets=ood)


def test_tuned_gram_and_mdsens_candidates_each_get_their_own_training_fit():
    # Each candidate of a tuned grid is fitted on the training split and scored on the
    # validation pair; the same values fixed, in a plain evaluation of that pair (its
    # own fit stage), must give the same AUROC.
    from ood_jax.evaluate.tuning import holdout_split

    model = tiny_eval_model(width=2, image_size=8)

    def labelled(ds, name):
        return D.from_arrays(ds.images, np.arange(len(ds)) % 3, name=name, num_classes=3)

    train = labelled(D.make_blobs(48, seed=3), "train")
    id_test = labelled(D.make_gaussian_noise(12, seed=1), "id")
    val_ood = D.make_gaussian_noise(14, seed=5)
    grids = {"gram": {"holdout": (0.0, 0.25)}, "mds_ensemble": {"noise": (0.0, 0.05)}}
    common = {"protocols": ("full",), "batch_size": 16, "plots": False}
    spec = EvalSpec(scores=tuple(grids), tune=tuple(grids), tune_grids=grids, val_size=16, **common)
    results = run_evaluation(
        model,
        spec,
        id_test=id_test,
        ood_sets={"blobs": D.make_blobs(10, seed=2)},
        train=train,
        val_ood=val_ood,
    )
    fit_set, val_id = holdout_split(train, 16, seed=0)
    for name, grid in grids.items():
        ((hparam, values),) = grid.items()
        candidates = results["tuning"][name]["candidates"]
        assert [c["hparams"][hparam] for c in candidates] == list(values)
        for candidate in candidates:
            fixed = EvalSpec(
                scores=(name,),
                score_hparams={name: {hparam: candidate["hparams"][hparam]}},
                **common,
            )
            alone = run_evaluation(
                model, fixed, id_test=val_id, ood_sets={"val": val_ood}, train=fit_set
            )
            auroc = alone["ood"]["full"]["metrics"][name]["val"]["auroc"]["mean"]
            assert candidate["auroc"] == pytest.approx(auroc, abs=1e-6), (name, candidate)
