"""A user's model as the evaluation's model: adapters, what a model serves, skipping.

The features an adapter captures are checked against the layer's input computed by
hand (the model's own layers applied step by step, linen's capture_intermediates);
what each built-in score declares it needs is checked by running it without the rest;
the images a user's model receives are checked against the stored pixels.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from ood_jax import data as D
from ood_jax.evaluate import (
    EvalSpec,
    as_classifier,
    capabilities,
    evaluate_model,
    run_evaluation,
    servable_scores,
)
from ood_jax.evaluate.adapters import check_head
from ood_jax.models import create_model
from ood_jax.scores import available_scores, get_score
from ood_jax.scores.registry import ArrayScore, FittedScore, Head

NUM_CLASSES = 4


class NNXNet(nnx.Module):
    """Logits only; a hidden layer, dropout and a final linear layer ``fc``."""

    def __init__(self, rngs, dropout=0.0):
        self.conv = nnx.Conv(3, 6, (3, 3), rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, NUM_CLASSES, rngs=rngs)])
        self.dropout = nnx.Dropout(dropout, rngs=rngs)

    def hidden(self, x):
        return nnx.relu(self.blocks[0](self.conv(x / 255.0).mean(axis=(1, 2))))

    def __call__(self, x):
        return self.blocks[1](self.dropout(self.hidden(x)))


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(6, (3, 3))(x / 255.0).mean(axis=(1, 2))
        h = nn.relu(nn.Dense(5, name="hidden")(h))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return nn.Dense(NUM_CLASSES, name="fc")(h)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (6, 32, 32, 3)).astype(np.float32)


def call(model, x):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def test_nnx_head_by_path_captures_its_input(images):
    net = NNXNet(nnx.Rngs(0))
    net.eval()
    adapted = as_classifier(net, head="blocks.1")
    logits, features = call(adapted, images)
    np.testing.assert_allclose(features, net.hidden(images), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, net(images), rtol=1e-5, atol=1e-5)
    assert adapted.head.kernel.shape == (5, NUM_CLASSES)
    # The user's model is not edited: its layer is still the plain Linear.
    assert type(net.blocks[1]) is nnx.Linear
    assert capabilities(adapted, (32, 32, 3), NUM_CLASSES) == {"features", "head"}


def test_nnx_logits_only_has_no_features_but_dropout(images):
    net = NNXNet(nnx.Rngs(0), dropout=0.3)
    adapted = as_classifier(net)
    adapted.eval()
    logits, features = call(adapted, images)
    assert features.shape == (6, 0)
    np.testing.assert_allclose(logits, net(images), rtol=1e-5, atol=1e-5)
    assert capabilities(adapted, (32, 32, 3), NUM_CLASSES) == {"dropout"}


def test_linen_head_by_name_equals_captured_intermediates(images):
    module = LinenNet()
    variables = module.init(jax.random.key(0), images[:1])
    adapted = as_classifier(module, variables, head="fc", apply_kwargs={"train": False})
    logits, features = call(adapted, images)
    # Reference: linen's own record of the hidden layer's output, through the ReLU.
    out, state = module.apply(variables, images, capture_intermediates=True)
    hidden = state["intermediates"]["hidden"]["__call__"][0]
    np.testing.assert_allclose(features, np.maximum(hidden, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(adapted.head.kernel[...], variables["params"]["fc"]["kernel"])
    assert capabilities(adapted, (32, 32, 3), NUM_CLASSES) == {"features", "head"}


def test_function_with_params_and_head_weights(images):
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(3, 7)).astype(np.float32)}
    kernel, bias = rng.normal(size=(7, NUM_CLASSES)), rng.normal(size=NUM_CLASSES)

    def fn(p, x):
        z = jnp.tanh(x.mean(axis=(1, 2)) / 255.0 @ p["w"])
        return z @ kernel.astype(np.float32) + bias.astype(np.float32), z

    adapted = as_classifier(fn, params, head=(kernel, bias))
    logits, features = call(adapted, images)
    z = np.tanh(images.mean(axis=(1, 2)) / 255.0 @ params["w"])
    np.testing.assert_allclose(features, z, rtol=1e-5, atol=1e-6)
    check_head(adapted, np.asarray(logits), np.asarray(features))
    wrong = as_classifier(fn, params, head=(kernel * 2, bias))
    logits, features = call(wrong, images)
    with pytest.raises(ValueError, match="not its features times the head"):
        check_head(wrong, np.asarray(logits), np.asarray(features))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: as_classifier(NNXNet(nnx.Rngs(0)), head="blocks.7"), "nnx.Linear layers are"),
        (lambda: as_classifier(NNXNet(nnx.Rngs(0)), head="conv"), "blocks.0, blocks.1"),
        (lambda: as_classifier(LinenNet()), "needs its variables"),
        (
            lambda: as_classifier(
                LinenNet(), LinenNet().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))), head="x"
            ),
            "hidden, fc",
        ),
        (lambda: as_classifier(lambda x: x, head="fc"), "NNX or linen module only"),
        (lambda: as_classifier(lambda x: x, head=(np.zeros((3, 4, 1)),)), r"\[D, K\]"),
        (lambda: as_classifier(3), "expected a Flax NNX or linen module"),
    ],
)
def test_adapter_errors_say_what_to_do(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_capabilities_refuse_outputs_off_the_contract():
    with pytest.raises(ValueError, match=r"logits must be \[batch, 10\]"):
        capabilities(as_classifier(NNXNet(nnx.Rngs(0))), (32, 32, 3), 10)
    with pytest.raises(ValueError, match="features must be"):
        fn = as_classifier(lambda x: (x[:, 0, 0, :NUM_CLASSES], x))
        capabilities(fn, (32, 32, 4), NUM_CLASSES)
    bad_head = as_classifier(
        lambda x: (x[:, 0, 0, :NUM_CLASSES], x[:, 0, 0]), head=(np.zeros((2, NUM_CLASSES)),)
    )
    with pytest.raises(ValueError, match=r"kernel is \(2, 4\)"):
        capabilities(bad_head, (32, 32, 6), NUM_CLASSES)


def test_own_models_serve_everything_but_absent_dropout():
    model = create_model("tiny", num_classes=NUM_CLASSES, width=4, rngs=nnx.Rngs(0))
    assert as_classifier(model) is model
    assert capabilities(model, (32, 32, 3), NUM_CLASSES) == {"features", "head", "intermediates"}


def _run_without(score, features, head, rng):
    n, k, d = 120, NUM_CLASSES, 6
    logits = rng.normal(size=(n, k)).astype(np.float32)
    feats = np.abs(rng.normal(size=(n, d))).astype(np.float32)
    labels = np.arange(n) % k
    full_head = Head(rng.normal(size=(d, k)).astype(np.float32), np.zeros(k, np.float32))
    f = feats if features else None
    h = full_head if head else None
    if isinstance(score, FittedScore):
        params = score.fit(logits, f, labels, **score.defaults)
        return np.asarray(score.fn(params, logits, f, h, **score.defaults))
    return np.asarray(score.fn(logits, f, h, **score.defaults))


@pytest.mark.parametrize(
    "name", [n for n in available_scores() if isinstance(get_score(n), ArrayScore)]
)
def test_declared_needs_match_what_the_score_reads(name):
    # A score that declares it needs less than features and head runs without the rest;
    # one that declares a need fails without it (so no declaration is looser than the code).
    score, rng = get_score(name), np.random.default_rng(0)
    has_f, has_h = "features" in score.needs, "head" in score.needs
    assert np.isfinite(_run_without(score, has_f, has_h, rng)).all()
    if has_f:
        with pytest.raises((ValueError, TypeError, AttributeError, IndexError)):
            _run_without(score, False, has_h, rng)
    if has_h:
        with pytest.raises((ValueError, TypeError, AttributeError, IndexError)):
            _run_without(score, has_f, False, rng)


def test_servable_scores_reasons():
    kept, skipped = servable_scores(("msp", "knn", "vim", "gram", "mc_dropout"), frozenset())
    assert kept == ("msp",)
    assert skipped["knn"].startswith("needs the model's features")
    assert skipped["vim"].startswith("needs the model's features and head")
    assert skipped["gram"].startswith("needs the model's intermediates")
    assert skipped["mc_dropout"].startswith("needs the model's dropout")
    kept, skipped = servable_scores(("msp", "knn"), frozenset({"features"}), has_train=False)
    assert kept == ("msp",) and "give id_train" in skipped["knn"]


def test_spec_with_scores_keeps_their_settings_only():
    spec = EvalSpec(
        scores=("msp", "knn", "odin"),
        score_hparams={"msp": {"temperature": (1, 1000)}, "knn": {"k": 5}},
        plot_scores=("msp", "msp_T1000", "knn"),
        tune=("knn",),
    )
    narrow = spec.with_scores(("msp", "odin"))
    assert narrow.scores == ("msp", "odin")
    assert set(narrow.score_hparams) == {"msp", "odin"}
    assert narrow.score_hparams["msp"] == spec.score_hparams["msp"]
    assert narrow.plot_scores == ("msp", "msp_T1000") and narrow.tune == ()
    with pytest.raises(ValueError, match="some of the spec's scores"):
        spec.with_scores(("energy",))


def _toy_sets():
    rng = np.random.default_rng(3)
    test = D.from_arrays(
        rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
        np.arange(40) % NUM_CLASSES,
        name="toy_id",
        num_classes=NUM_CLASSES,
    )
    train = D.from_arrays(
        rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
        np.arange(60) % NUM_CLASSES,
        name="toy_train",
        num_classes=NUM_CLASSES,
    )
    ood = D.from_arrays(
        rng.integers(0, 64, (30, 32, 32, 3), dtype=np.uint8),
        np.full(30, -1),
        name="dark",
        num_classes=0,
    )
    return train, test, ood


def test_evaluate_model_feeds_stored_pixels_and_skips_with_one_warning_each(tmp_path):
    train, test, ood = _toy_sets()
    weights = np.random.default_rng(4).normal(size=(3, NUM_CLASSES)).astype(np.float32)

    def logits_fn(x):  # a logits-only function of the raw pixel values
        return (x.mean(axis=(1, 2)) / 255.0) @ weights

    chosen = ("msp", "energy", "knn", "vim", "gram")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = evaluate_model(
            logits_fn,
            id_test=test,
            id_train=train,
            ood_sets={"dark": ood},
            scores=chosen,
            protocols=("full",),
            out_dir=tmp_path / "report",
            plots=False,
        )
    skipping = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert sorted(s.split("'")[1] for s in skipping) == ["gram", "knn", "vim"]
    assert all(w.filename == __file__ for w in caught if "skipping" in str(w.message))
    assert results["scores"] == ["msp", "energy"]
    assert set(results["skipped_scores"]) == {"knn", "vim", "gram"}
    # MSP of the stored uint8 pixels, computed in NumPy: the model saw 0..255 values.
    scores = np.load(tmp_path / "report" / "scores.npz")
    logits = (test.images.astype(np.float64).mean(axis=(1, 2)) / 255.0) @ weights
    p = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(scores["id/msp"], (p / p.sum(1, keepdims=True)).max(1), rtol=1e-5)
    text = (tmp_path / "report" / "results.md").read_text()
    assert "- model: logits_fn (function)" in text
    assert "unrecorded" not in text and "step None" not in text and "command" not in text
    assert "skipped knn: it needs the model's features" in text


def test_evaluate_model_without_training_set_skips_fitted_scores():
    train, test, ood = _toy_sets()
    net = NNXNet(nnx.Rngs(0))
    with pytest.warns(UserWarning, match="skipping 'knn': it is fitted"):
        results = evaluate_model(
            net,
            head="blocks.1",
            id_test=test,
            ood_sets={"dark": ood},
            scores=("msp", "feature_norm", "knn"),
            protocols=("full",),
            plots=False,
        )
    assert results["scores"] == ["msp", "feature_norm"]
    assert results["model"]["description"] == "NNXNet (Flax NNX, head 'blocks.1')"
    assert results["model_capabilities"] == ["features", "head"]


def test_run_evaluation_skips_what_the_model_cannot_serve():
    train, test, ood = _toy_sets()
    spec = EvalSpec(scores=("msp", "mc_dropout", "ash_p_map"), protocols=("full",), plots=False)
    model = create_model("tiny", num_classes=NUM_CLASSES, width=4, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="skipping 'mc_dropout'"):
        results = run_evaluation(model, spec, id_test=test, ood_sets={"dark": ood})
    assert results["scores"][0] == "msp" and "ash_p_map" in results["scores"]
    assert list(results["skipped_scores"]) == ["mc_dropout"]
    with pytest.raises(ValueError, match="can serve none"), pytest.warns(UserWarning):
        run_evaluation(
            as_classifier(lambda x: x.mean(axis=(1, 2))[:, :1] @ np.ones((1, NUM_CLASSES))),
            EvalSpec(scores=("knn",), protocols=("full",)),
            id_test=test,
            ood_sets={"dark": ood},
            train=train,
        )


def test_evaluate_model_inputs_option(tmp_path):
    train, test, ood = _toy_sets()
    weights = np.random.default_rng(5).normal(size=(3, NUM_CLASSES)).astype(np.float32) * 40

    def fn(x):
        return x.mean(axis=(1, 2)) @ weights

    common = dict(id_test=test, ood_sets={"dark": ood}, scores=("max_logit",), plots=False)
    evaluate_model(fn, inputs="unit", protocols=("full",), out_dir=tmp_path / "u", **common)
    got = np.load(tmp_path / "u" / "scores.npz")["id/max_logit"]
    expected = ((test.images.astype(np.float64) / 255.0).mean(axis=(1, 2)) @ weights).max(1)
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="inputs: expected one of"):
        evaluate_model(fn, inputs="imagenet", **common)


def test_a_score_with_nan_or_inf_is_skipped_and_named_not_the_whole_evaluation(monkeypatch):
    from ood_jax.scores import registry

    monkeypatch.setattr(registry._REGISTRY, "_entries", dict(registry._REGISTRY._entries))

    @registry.register_score("first_inf", consumes="outputs", display="First inf")
    def first_inf(logits, features, head):
        # The first example scores +inf, the second NaN, the others their max logit.
        row = jnp.arange(logits.shape[0])
        fine = logits.max(axis=-1)
        return jnp.where(row == 0, jnp.inf, jnp.where(row == 1, jnp.nan, fine))

    train, test, ood = _toy_sets()
    spec = EvalSpec(scores=("msp", "first_inf"), protocols=("full",), batch_size=16, plots=False)
    model = create_model("tiny", num_classes=NUM_CLASSES, width=4, rngs=nnx.Rngs(0))
    with pytest.warns(UserWarning, match="skipping 'first_inf': it gave NaN or infinite"):
        results = run_evaluation(model, spec, id_test=test, ood_sets={"dark": ood})
    why = results["skipped_scores"]["first_inf"]
    assert "'first_inf' on 2 of 40 'toy_id' examples" in why
    assert "'dark'" not in why  # the sets are scored as one array: rows 0, 1 are ID
    assert results["scores"] == ["msp"] and list(results["spec"]["scores"]) == ["msp"]
    assert list(results["ood"]["full"]["metrics"]) == ["msp"]
    # MSP's metrics are those of the evaluation without the broken score.
    alone = run_evaluation(
        model,
        EvalSpec(scores=("msp",), protocols=("full",), batch_size=16, plots=False),
        id_test=test,
        ood_sets={"dark": ood},
    )
    assert results["ood"]["full"]["metrics"] == alone["ood"]["full"]["metrics"]
    # Nothing left to report: one error naming the score and where.
    only = EvalSpec(scores=("first_inf",), protocols=("full",), batch_size=16, plots=False)
    with pytest.raises(ValueError, match="every score gave NaN or infinite values.*2 of 40"):
        run_evaluation(model, only, id_test=test, ood_sets={"dark": ood})


def test_scale_overflows_where_negative_features_make_the_kept_sum_tiny():
    # Why the rule above exists: SCALE (and ASH-S) multiply by exp(s1 / s2); with
    # leaky-ReLU features the kept (largest) entries can sum to almost nothing.
    from ood_jax.evaluate import ScoreTable, without_non_finite
    from ood_jax.scores import shaping

    # Row 1: all entries negative, the kept one -0.001, so s1 / s2 = 120001.
    features = np.array([[1.0, 0.5, -0.2, -0.1], [-1e-3, -50.0, -40.0, -30.0]], np.float32)
    shaped = np.asarray(shaping.scale(jnp.asarray(features), percentile=75))
    s1, s2 = features.sum(axis=1), features.max(axis=1)  # k = 1 entry kept
    np.testing.assert_allclose(shaped[0], features[0] * np.exp(s1[0] / s2[0]), rtol=1e-6)
    assert s1[1] / s2[1] > 1e5 and not np.all(np.isfinite(shaped[1]))
    ids = {"scale": np.array([1.0, np.inf, 2.0]), "msp": np.array([0.9, 0.8, 0.7])}
    oods = {"far": {"scale": np.array([0.5, 0.4]), "msp": np.array([0.2, 0.1])}}
    table = ScoreTable("id", {"id": ids, **oods}, [(ids, oods)], {}, {"scale": "S", "msp": "M"})
    kept, why = without_non_finite(table, ["msp", "scale"])
    assert list(why) == ["scale"] and "'scale' on 1 of 3 'id' examples" in why["scale"]
    assert list(kept.id_scores) == ["msp"] and list(kept.groups[0][1]["far"]) == ["msp"]
    assert kept.display == {"msp": "M"}
    assert without_non_finite(kept, ["msp"]) == (kept, {})


def test_tuning_passes_over_candidates_with_nan_or_inf_and_stops_when_all_are(monkeypatch):
    from ood_jax.scores import registry

    monkeypatch.setattr(registry._REGISTRY, "_entries", dict(registry._REGISTRY._entries))

    @registry.register_score(
        "inf_below", consumes="outputs", display="Inf below", defaults={"a": 1.0}
    )
    def inf_below(logits, features, head, *, a):
        # a < 2: the first example scores +inf; a >= 2: minus the max logit (finite).
        first = jnp.arange(logits.shape[0]) == 0
        return jnp.where(first & (a < 2), jnp.inf, -a * logits.max(axis=-1))

    train, test, ood = _toy_sets()
    val = D.from_arrays(ood.images[::-1], ood.labels, name="val_dark", num_classes=0)
    model = create_model("tiny", num_classes=NUM_CLASSES, width=4, rngs=nnx.Rngs(0))

    def spec(grid):
        return EvalSpec(
            scores=("msp", "inf_below"),
            tune=("inf_below",),
            tune_grids={"inf_below": {"a": grid}},
            val_size=20,
            protocols=("full",),
            plots=False,
        )

    results = run_evaluation(
        model, spec((1.0, 3.0)), id_test=test, ood_sets={"dark": ood}, train=train, val_ood=val
    )
    record = results["tuning"]["inf_below"]
    assert np.isnan(record["candidates"][0]["auroc"]) and record["chosen"] == {"a": 3.0}
    assert "inf_below" in results["ood"]["full"]["metrics"]
    with pytest.raises(ValueError, match="every candidate of 'inf_below' \\(2\\) gave NaN"):
        run_evaluation(
            model, spec((0.5, 1.0)), id_test=test, ood_sets={"dark": ood}, train=train, val_ood=val
        )
