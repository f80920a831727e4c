"""The score registry: the kinds and their validity rules, registration, the report's order."""

import dataclasses
import subprocess
import sys

import pytest

from ood_jax.scores import (
    ActivationScore,
    ArrayScore,
    FittedScore,
    ImageScore,
    ModelScore,
    Score,
    available_scores,
    catalog,
    get_score,
    register_score,
    registry,
)


def fn(*args, **kwargs):
    return None


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations in the test are dropped after it."""
    monkeypatch.setattr(registry._REGISTRY, "_entries", dict(registry._REGISTRY._entries))


# --- The order ------------------------------------------------------------------------


def test_the_builtins_come_in_the_catalogs_explicit_order():
    assert len(catalog.ORDER) == 44 and len(set(catalog.ORDER)) == 44
    names = available_scores()
    assert names[: len(catalog.ORDER)] == catalog.ORDER
    assert not set(names[len(catalog.ORDER) :]) & set(catalog.ORDER)
    assert tuple(s.name for s in catalog.builtin_scores()) == catalog.ORDER
    # Each registered built-in is its module's score, with the catalog's NEEDS (equal in
    # every field, the function itself included).
    assert all(get_score(s.name) == s for s in catalog.builtin_scores())


def test_a_user_score_comes_after_the_builtins_in_registration_order(scratch_registry):
    @register_score("zz_user_first", consumes="outputs", display="Z1")
    def first(logits, features, head):
        return features.sum(-1)

    register_score(ArrayScore("aa_user_second", first, "A2"))
    names = available_scores()
    assert names[: len(catalog.ORDER)] == catalog.ORDER
    assert names[-2:] == ("zz_user_first", "aa_user_second")
    # replace=True keeps a built-in in its place.
    register_score(ArrayScore("energy", first, "Mine"), replace=True)
    assert available_scores() == names and get_score("energy").display == "Mine"


def test_the_order_does_not_depend_on_which_module_is_imported_first():
    code = (
        "import ood_jax.scores.mds, ood_jax.scores.dropout, ood_jax.scores.gram; "
        "from ood_jax.scores import available_scores; print(','.join(available_scores()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert tuple(out.strip().split(",")) == catalog.ORDER


def test_the_catalog_refuses_a_builtin_missing_from_its_order(monkeypatch):
    extra = ArrayScore("not_in_order", fn, "X")
    monkeypatch.setattr(catalog.gram, "SCORES", (*catalog.gram.SCORES, extra))
    with pytest.raises(ValueError, match=r"declared, not in ORDER \['not_in_order'\]"):
        catalog.builtin_scores()
    monkeypatch.setattr(catalog.gram, "SCORES", ())
    with pytest.raises(ValueError, match=r"in ORDER, not declared \['gram'\]"):
        catalog.builtin_scores()


# --- The kinds ------------------------------------------------------------------------


def test_every_builtin_is_an_instance_of_its_kind():
    kinds = {
        "msp": ArrayScore,
        "knn": FittedScore,
        "odin": ImageScore,
        "mc_dropout": ImageScore,
        "mds_ensemble": ImageScore,
        "ash_b_map": ActivationScore,
        "gram": ActivationScore,
    }
    for name, kind in kinds.items():
        assert type(get_score(name)) is kind and isinstance(get_score(name), Score)
    consumes = {get_score(n).consumes for n in available_scores()}
    assert consumes == {"outputs", "fitted", "images", "activations"}
    assert isinstance(get_score("knn"), ArrayScore)  # a fitted score is scored from the arrays
    assert isinstance(get_score("gram"), ModelScore) and get_score("gram").fitted
    assert not get_score("odin").fitted and get_score("mahalanobis_odin").fitted


def test_the_base_is_not_a_kind_and_consumes_is_read_only():
    with pytest.raises(TypeError, match="build an ArrayScore, FittedScore"):
        Score("x", fn, "X")
    with pytest.raises(TypeError, match="ModelScore is a base of the score kinds"):
        ModelScore("x", fn, "X")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_score("msp").consumes = "fitted"


def _refused(kind, match, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        kind("bad", fn, "Bad", *args, **kwargs)
    assert f"score 'bad' ({kind.__name__})" in str(info.value)


@pytest.mark.parametrize(
    "kind, extra",
    [
        (ArrayScore, {}),
        (FittedScore, {"fit": fn}),
        (ImageScore, {}),
        (ActivationScore, {"captures": ("pre_pool",)}),
    ],
)
def test_every_kind_refuses_a_bad_sweep_or_grid(kind, extra):
    _refused(kind, "sweep 'p' is not in defaults", {}, sweep="p", sweep_label="p", **extra)
    _refused(kind, "sweep_label without '_'", {"p": 1.0}, sweep_label="a_b", **extra)
    _refused(kind, "a grid gives values", {"p": 1.0}, grid={"q": (1,)}, **extra)
    _refused(kind, "a grid gives values", {"p": 1.0}, grid={"p": ()}, **extra)
    kind("ok", fn, "OK", {"p": 1.0}, grid={"p": (1.0, 2.0)}, **extra)


def test_array_and_fitted_scores_refuse_what_they_do_not_have():
    _refused(ArrayScore, "sweep_label without '_'", {"t": 1.0}, sweep="t")
    ArrayScore("ok", fn, "OK", {"t": 1.0}, sweep="t", sweep_label="T", jit=False)
    with pytest.raises(TypeError, match="fit"):
        ArrayScore("bad", fn, "Bad", fit=fn)
    with pytest.raises(TypeError, match="captures"):
        FittedScore("bad", fn, "Bad", fit=fn, captures=("pre_pool",))
    with pytest.raises(TypeError, match="fit"):
        FittedScore("bad", fn, "Bad")
    _refused(FittedScore, "needs fit=", fit=None)


def test_image_scores_refuse_invalid_combinations():
    ImageScore("ok", fn, "OK", {"seed": 0}, stochastic=True)
    ImageScore("ok", fn, "OK", fit=fn)
    ImageScore("ok", fn, "OK", captures=("blocks",), fit=fn, fit_features=fn)
    _refused(ImageScore, "a stochastic score needs a 'seed'", stochastic=True)
    _refused(ImageScore, "a stochastic score is not fitted", {"seed": 0}, stochastic=True, fit=fn)
    _refused(ImageScore, "captures= name what a fitted", captures=("blocks",))
    _refused(ImageScore, "needs fit_features=", captures=("blocks",), fit=fn)
    _refused(ImageScore, "needs fit_features=, others none", fit=fn, fit_features=fn)
    _refused(ImageScore, "no sweep", {"t": 1.0}, sweep="t", sweep_label="T")


def test_activation_scores_refuse_invalid_combinations():
    ActivationScore("ok", fn, "OK", {"p": 1.0}, sweep="p", sweep_label="p", captures=("x",))
    ActivationScore("ok", fn, "OK", captures=("blocks",), fit=fn, fit_features=fn)
    _refused(ActivationScore, "needs captures=")
    _refused(ActivationScore, "needs fit_features=", captures=("blocks",), fit=fn)
    _refused(ActivationScore, "others none", captures=("blocks",), fit_features=fn)
    with pytest.raises(TypeError, match="stochastic"):
        ActivationScore("bad", fn, "Bad", captures=("x",), stochastic=True)


# --- The former Score(...) arguments: register_score and Score.from_consumes -----------


def test_from_consumes_builds_the_kind_and_refuses_foreign_fields():
    assert type(Score.from_consumes("a", fn, "outputs", "A")) is ArrayScore
    fitted = Score.from_consumes("f", fn, "fitted", "F", {"k": 1}, fn, jit=False)
    assert type(fitted) is FittedScore and fitted.fit is fn and not fitted.jit
    image = Score.from_consumes("i", fn, "images", "I", {"seed": 0}, jit=False, stochastic=True)
    assert type(image) is ImageScore and image.stochastic  # jit: ignored for model kinds
    acts = Score.from_consumes("m", fn, "activations", "M", captures=("pre_pool",))
    assert type(acts) is ActivationScore and acts.consumes == "activations"
    with pytest.raises(ValueError, match="consumes must be one of"):
        Score.from_consumes("x", fn, "logits", "X")
    with pytest.raises(ValueError, match=r"ArrayScore \(consumes='outputs'\) takes no fit="):
        Score.from_consumes("x", fn, "outputs", "X", fit=fn)
    with pytest.raises(ValueError, match="takes no captures=, stochastic="):
        Score.from_consumes("x", fn, "fitted", "X", fit=fn, captures=("a",), stochastic=True)
    with pytest.raises(ValueError, match=r"score 'x' \(FittedScore\): needs fit="):
        Score.from_consumes("x", fn, "fitted", "X")
    with pytest.raises(ValueError, match=r"score 'x' \(ActivationScore\): needs captures="):
        Score.from_consumes("x", fn, "activations", "X")


def test_register_score_builds_the_kind_consumes_names(scratch_registry):
    @register_score("t_fitted", consumes="fitted", fit=fn, defaults={"k": 2}, jit=False)
    def scored(params, logits, features, head, *, k):
        return features

    score = get_score("t_fitted")
    assert type(score) is FittedScore and score.fn is scored and score.display == "t_fitted"
    assert score.defaults == {"k": 2} and score.fit is fn and not score.jit
    register_score("t_images", consumes="images")(fn)
    assert type(get_score("t_images")) is ImageScore
    with pytest.raises(ValueError, match="takes no fit="):
        register_score("t_bad", fit=fn)(fn)
    with pytest.raises(ValueError, match="already registered"):
        register_score(ArrayScore("msp", fn, "MSP"))
