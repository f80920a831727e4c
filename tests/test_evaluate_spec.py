"""EvalSpec: resolved fields, its own validation, and its entries of results.json."""

import dataclasses
import json

import pytest

from ood_jax.evaluate import EvalSpec
from ood_jax.scores import available_scores


def test_defaults_resolve_to_every_registered_score_and_their_defaults():
    spec = EvalSpec()
    assert spec.scores == available_scores()
    assert spec.protocols == ("papers", "full") and spec.convention == "hendrycks"
    # The registered defaults, written out: MSP's temperature sweep of one value, kNN's k.
    assert spec.score_hparams["msp"] == {"temperature": (1.0,)}
    assert spec.score_hparams["knn"]["k"] == 50
    assert spec.mean == pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255))
    fitted = {"mahalanobis", "knn", "gmm", "react", "mahalanobis_l2", "gmm_l2"}
    fitted |= {"fdbd", "rmds", "relation", "vim", "temp_scale", "klm", "nnguide", "nci", "she"}
    fitted |= {"dice", "vra", "residual", "pnml", "openmax"}
    fitted |= {"gram", "mahalanobis_odin", "mds_ensemble"}  # fitted scores of the model
    assert set(spec.fitted_scores) == fitted


def test_overrides_are_resolved_and_the_spec_is_frozen():
    spec = EvalSpec(
        scores=["msp", "knn", "msp"],
        score_hparams={"msp": {"temperature": [1, 1000]}, "knn": {"k": 5}, "odin": {}},
        protocols=["full"],
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
    assert spec.scores == ("msp", "knn")
    # ODIN's override is ignored (not chosen); the sweep becomes a tuple of floats.
    assert list(spec.score_hparams) == ["msp", "knn"]
    assert spec.score_hparams["msp"] == {"temperature": (1.0, 1000.0)}
    assert spec.score_hparams["knn"]["k"] == 5
    assert spec.protocols == ("full",) and spec.mean == (0.5, 0.5, 0.5)
    assert spec.fitted_scores == ["knn"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scores": ["nonexistent"]}, "nonexistent"),
        ({"scores": []}, "none given"),
        ({"score_hparams": {"knn": {"kk": 3}}}, "unknown"),
        ({"protocols": []}, "at least one"),
        ({"protocols": ["papers", "fast"]}, "'fast' is not one of"),
        ({"convention": "sklearn"}, "convention"),
        ({"num_draws": 0}, "num_draws: expected an integer >= 1"),
        ({"num_ood": 0}, "num_ood: expected an integer >= 1 or None"),
        ({"max_ood": 0}, "max_ood"),
        ({"max_train": 2.5}, "max_train"),
        ({"seed": -1}, "seed: expected an integer >= 0"),
        ({"adversarial_noise": -5}, "adversarial_noise"),
        ({"attack_steps": True}, "attack_steps"),
        ({"attack_eps": -0.1}, "attack_eps"),
        ({"batch_size": 0}, "batch_size"),
        ({"std": (0.2, 0.0, 0.2)}, "positive std"),
        ({"mean": (0.5,)}, "one mean"),
    ],
)
def test_bad_fields_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EvalSpec(**kwargs)


def test_report_entries_are_plain_values():
    spec = EvalSpec(scores=["msp"], num_draws=3, seed=7, max_ood=100)
    as_json = json.loads(json.dumps(spec.to_dict()))
    assert as_json["scores"] == ["msp"] and as_json["num_draws"] == 3
    assert as_json["max_ood"] == 100 and as_json["plot_scores"] is None
    assert spec.protocol_options() == {
        "num_ood": None,
        "num_draws": 3,
        "seed": 7,
        "convention": "hendrycks",
        "max_train": None,
        "max_ood": 100,
        "adversarial_noise": 0,
        "attack_steps": None,
        "attack_eps": None,
    }
    attacked = EvalSpec(scores=["msp"], adversarial_noise=10, attack_steps=5)
    assert attacked.protocol_options()["attack_steps"] == 5
    assert attacked.protocol_options()["attack_eps"] == 0.3
