"""Hyperparameters chosen on a validation pair: the choice, the refusals, the report.

The model is linear on the flattened normalized pixels (``toy_models.FlatLinear``), so
every score is recomputed here with NumPy from the pixels and the head's weights, and
the choice is a slow loop's argmax of scikit-learn's validation AUROC.
"""

import json

import numpy as np
import pytest
import scipy.optimize
import scipy.special
from flax import nnx
from sklearn.metrics import roc_auc_score
from toy_models import FlatLinear

from experiments import cli
from experiments.configs import default as presets
from experiments.run_config import eval_spec, validate_config
from experiments.train import SCHEMA_FIELDS, complete_config
from experiments.train import main as train_main
from ood_jax import data as D
from ood_jax.evaluate import EvalSpec, run_evaluation
from ood_jax.evaluate.tuning import holdout_split

K, VAL_SIZE = 3, 40


def _images(n, seed, low, high, labels=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(low, high, (n, 32, 32, 3)).astype(np.uint8)
    return D.from_arrays(
        images,
        rng.integers(0, K, n) if labels else None,
        name=f"set{seed}",
        num_classes=K if labels else 0,
        source=f"seed {seed}",
    )


@pytest.fixture(scope="module")
def model():
    return FlatLinear(32 * 32 * 3, K, rngs=nnx.Rngs(0))


def _outputs(model, ds):
    """(logits, features) in float64 from the pixels and the head, with NumPy."""
    x = (ds.images / 255.0 - np.asarray(D.CIFAR10_MEAN)) / np.asarray(D.CIFAR10_STD)
    z = x.reshape(len(ds), -1)
    kernel, bias = np.asarray(model.head.kernel[...]), np.asarray(model.head.bias[...])
    return z @ kernel + bias, z


def _softmax(f):
    return np.exp(f - scipy.special.logsumexp(f, axis=1, keepdims=True))


def _msp(f, _z, temperature):
    return _softmax(f / temperature).max(1)


def _gen(f, _z, gamma, m):
    top = -np.sort(-_softmax(f), axis=1)[:, :m]
    return -np.sum(top**gamma * (1 - top) ** gamma, axis=1)


def _knn(z, bank, k):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    similarity = unit(z) @ unit(bank).T
    kth = -np.sort(-similarity, axis=1)[:, k - 1]
    return -np.sqrt(np.maximum(2 - 2 * kth, 0))


def _auroc(id_scores, ood_scores):
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return roc_auc_score(labels, np.r_[id_scores, ood_scores])


GRIDS = {
    "msp": [{"temperature": t} for t in (0.5, 1.0, 4.0)],
    "gen": [{"m": m, "gamma": g} for m in (1, 2) for g in (0.1, 2.0)],
    "knn": [{"k": k} for k in (1, 3, 10)],
}


@pytest.fixture(scope="module")
def tuned(model, tmp_path_factory):
    train = _images(160, seed=1, low=0, high=256)
    id_test = _images(50, seed=2, low=0, high=256)
    ood = {"dim": _images(30, seed=3, low=0, high=150, labels=False)}
    val_ood = _images(35, seed=4, low=40, high=256, labels=False)
    spec = EvalSpec(
        scores=("msp", "gen", "knn", "energy"),
        score_hparams={"msp": {"temperature": (0.5, 1.0, 4.0)}},
        tune=("msp", "gen", "knn"),
        tune_grids={"gen": {"m": (1, 2), "gamma": (0.1, 2.0)}, "knn": {"k": (1, 3, 10)}},
        val_size=VAL_SIZE,
        protocols=("full",),
        batch_size=32,
        plots=False,
    )
    out_dir = tmp_path_factory.mktemp("tuned") / "eval"
    results = run_evaluation(
        model, spec, id_test=id_test, ood_sets=ood, train=train, val_ood=val_ood, out_dir=out_dir
    )
    return results, out_dir, train, id_test, ood, val_ood


def test_the_choice_is_the_argmax_of_a_slow_loop_over_the_grid(model, tuned):
    results, _, train, id_test, ood, val_ood = tuned
    fit_set, val_id = holdout_split(train, VAL_SIZE, seed=0)
    bank = _outputs(model, fit_set)[1]
    fns = {
        "msp": lambda f, z, hp: _msp(f, z, **hp),
        "gen": lambda f, z, hp: _gen(f, z, **hp),
        "knn": lambda f, z, hp: _knn(z, bank, **hp),
    }
    val_in, val_out = _outputs(model, val_id), _outputs(model, val_ood)
    test_in, test_out = _outputs(model, id_test), _outputs(model, ood["dim"])
    metrics = results["ood"]["full"]["metrics"]
    for name, grid in GRIDS.items():
        record = results["tuning"][name]
        aurocs = [_auroc(fns[name](*val_in, hp), fns[name](*val_out, hp)) for hp in grid]
        assert len(set(np.round(aurocs, 6))) > 1, (name, aurocs)  # a real choice
        got = {json.dumps(c["hparams"], sort_keys=True): c["auroc"] for c in record["candidates"]}
        for hp, auroc in zip(grid, aurocs, strict=True):
            assert got[json.dumps(hp, sort_keys=True)] == pytest.approx(auroc, abs=1e-5), name
        best = grid[int(np.argmax(aurocs))]
        assert record["chosen"] == best and record["val_auroc"] == pytest.approx(max(aurocs))
        # The test sets are scored at the chosen values only.
        keys = [k for k in metrics if k == name or k.startswith(f"{name}_")]
        assert keys == [record["key"]], (name, keys)
        expected = _auroc(fns[name](*test_in, best), fns[name](*test_out, best))
        assert metrics[record["key"]]["dim"]["auroc"]["mean"] == pytest.approx(expected, abs=1e-5)
        for hparam, value in best.items():
            stored = results["score_hparams"][name][hparam]
            assert (stored[0] if isinstance(stored, list | tuple) else stored) == value
    # The fits never see the held-out images; an untuned score is left alone.
    assert results["data"]["train"]["num_examples"] == len(train) - VAL_SIZE
    assert results["data"]["val_id"]["num_examples"] == VAL_SIZE
    assert "energy" in metrics and "energy" not in results["tuning"]


def test_the_report_records_the_choice(tuned):
    results, out_dir, *_ = tuned
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["tuning"]["knn"]["chosen"] == results["tuning"]["knn"]["chosen"]
    assert saved["tuning"]["gen"]["grid"] == {"m": [1, 2], "gamma": [0.1, 2.0]}
    assert saved["spec"]["tune"] == ["msp", "gen", "knn"]
    assert saved["data"]["val_ood"]["name"] == "set4"
    assert saved["score_display"][results["tuning"]["knn"]["key"]] == "KNN (tuned)"
    assert saved["score_display"]["energy"] == "Energy"
    text = (out_dir / "results.md").read_text()
    assert "## Hyperparameters chosen on validation" in text
    k = results["tuning"]["knn"]["chosen"]["k"]
    assert f"#### KNN: k={k} (result key `knn`)" in text
    assert "- OOD validation set: set4 (35 images; seed 4)" in text
    chosen_rows = [line for line in text.splitlines() if line.endswith("✓ |")]
    assert len(chosen_rows) == 3 and any(line.startswith(f"| k={k} |") for line in chosen_rows)


def test_holdout_split_is_seeded_disjoint_and_complete():
    train = _images(50, seed=5, low=0, high=256)
    rest, held = holdout_split(train, 12, seed=3)
    assert (len(rest), len(held)) == (38, 12)
    rows = lambda ds: {img.tobytes() for img in ds.images}
    assert rows(rest).isdisjoint(rows(held)) and rows(rest) | rows(held) == rows(train)
    again = holdout_split(train, 12, seed=3)[1]
    assert np.array_equal(again.images, held.images)
    assert not np.array_equal(holdout_split(train, 12, seed=4)[1].images, held.images)
    with pytest.raises(ValueError, match="leave none of the 50 training images"):
        holdout_split(train, 50, seed=0)


def test_temp_scale_fitted_on_the_held_out_split(model):
    train = _images(120, seed=6, low=0, high=256)
    id_test = _images(30, seed=7, low=0, high=256)
    ood = {"dim": _images(20, seed=8, low=0, high=150, labels=False)}
    spec = EvalSpec(
        scores=("temp_scale",),
        fit_on_val=("temp_scale",),
        val_size=50,
        protocols=("full",),
        plots=False,
    )
    results = run_evaluation(model, spec, id_test=id_test, ood_sets=ood, train=train)
    val_logits = _outputs(model, holdout_split(train, 50, seed=0)[1])[0]
    labels = holdout_split(train, 50, seed=0)[1].labels

    def nll(log_t):
        f = val_logits / np.exp(log_t)
        return np.mean(scipy.special.logsumexp(f, axis=1) - f[np.arange(len(f)), labels])

    best = scipy.optimize.minimize_scalar(nll, bounds=(-7, 7), method="bounded").x
    expected = _auroc(
        _msp(_outputs(model, id_test)[0], None, np.exp(best)),
        _msp(_outputs(model, ood["dim"])[0], None, np.exp(best)),
    )
    got = results["ood"]["full"]["metrics"]["temp_scale"]["dim"]["auroc"]["mean"]
    assert got == pytest.approx(expected, abs=1e-5)
    assert results["data"]["train"] is None and results["data"]["val_id"]["num_examples"] == 50


def test_a_test_set_as_validation_set_is_refused(model):
    train = _images(60, seed=1, low=0, high=256)
    id_test = _images(20, seed=2, low=0, high=256)
    dim = _images(20, seed=3, low=0, high=150, labels=False)
    spec = EvalSpec(scores=("gen",), tune=("gen",), val_size=10, plots=False)
    renamed = D.ImageDataset(dim.images, dim.labels, name="other", num_classes=0)
    for val_ood in (dim, renamed, id_test):
        with pytest.raises(ValueError, match="never chosen on a test set"):
            run_evaluation(
                model, spec, id_test=id_test, ood_sets={"set3": dim}, train=train, val_ood=val_ood
            )
    with pytest.raises(ValueError, match="pass the OOD validation set when tuning"):
        run_evaluation(model, spec, id_test=id_test, ood_sets={"set3": dim}, train=train)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scores": ("msp",), "tune": ("knn",)}, "'knn' is not among the chosen scores"),
        ({"scores": ("msp",), "tune": ("msp",)}, "score 'msp' has no grid"),
        ({"scores": ("knn",), "tune": ("knn",), "tune_grids": {"knn": {"K": (1,)}}}, "'K'"),
        ({"scores": ("msp",), "fit_on_val": ("msp",)}, "'msp' is not a chosen fitted score"),
        (
            {"scores": ("knn",), "tune": ("knn",), "fit_on_val": ("knn",)},
            "'knn' is tuned",
        ),
        ({"scores": ("msp",), "val_size": 0}, "val_size: expected an integer >= 1"),
    ],
)
def test_spec_rejects_bad_tuning(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalSpec(**kwargs)


def test_spec_grids_from_the_registry_the_sweep_and_overrides():
    spec = EvalSpec(scores=("react", "msp", "energy"), tune=("all",))
    assert spec.tune == ("react",)  # OpenOOD searches ReAct; MSP and energy have no grid
    assert spec.tune_grids == {"react": {"percentile": (85.0, 90.0, 95.0, 99.0)}}
    spec = EvalSpec(
        scores=("msp", "react"),
        score_hparams={"msp": {"temperature": [1, 10]}},
        tune=("msp", "react"),
        tune_grids={"react": {"percentile": [80]}},
    )
    assert spec.tune_grids == {"msp": {"temperature": (1.0, 10.0)}, "react": {"percentile": (80,)}}


def _parse(overrides):
    return cli.apply_overrides(
        presets.get_config("smoke", "ce"), overrides, first=SCHEMA_FIELDS, prepare=complete_config
    )


def test_config_tuning_fields_reach_the_spec():
    config = _parse(
        [
            "--config.eval.ood=true",
            "--config.eval.tune=knn,react",
            "--config.eval.tune_grids.knn.k=10,20",
            "--config.eval.fit_on_val=temp_scale,klm",
            "--config.eval.val_size=300",
        ]
    )
    validate_config(config)
    spec = eval_spec(config, batch_size=8)
    assert spec.tune == ("knn", "react") and spec.tune_grids["knn"] == {"k": (10, 20)}
    assert spec.fit_on_val == ("temp_scale", "klm") and spec.val_size == 300
    assert eval_spec(_parse([]), batch_size=8).tune == ()  # default: the registered values


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.eval.tune=knn", "--config.eval.tune_ood=gaussian"],
            "config.eval.tune_ood: 'gaussian' is one of the OOD test sets",
        ),
        (["--config.eval.tune=knn", "--config.eval.tune_ood=nope"], "unknown OOD set 'nope'"),
        (["--config.eval.tune=msp"], "config.eval: tune: score 'msp' has no grid"),
        (["--config.eval.tune=bogus"], "'bogus' is not among the chosen scores"),
        (["--config.eval.tune_grids.knn.K=1", "--config.eval.tune=knn"], "got unknown ['K']"),
    ],
)
def test_bad_tuning_values_exit_2_with_one_line(tmp_path, capsys, args, message):
    argv = [f"--workdir={tmp_path / 'run'}", "--preset=smoke", f"--data={tmp_path}"]
    with pytest.raises(SystemExit) as exit_info:
        train_main([*argv, "--config.eval.ood=true", *args], method="ce")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()
