"""Registry entries of the post-hoc detectors that need logits, features and the head only.

TempScale, KL matching, GEN, ViM, RMDS, NNGuide, fDBD, Relation, NCI, SHE,
DICE, VRA, Residual, LTS, pNML, OpenMax and WeightedEBO (``SCORES``; :mod:`ood_jax.scores.catalog`
registers them in the report's order). Defaults are the reference
implementations' (``docs/detectors.md`` names each reference file); a ``grid`` is
OpenOOD v1.5's ``postprocessor_sweep`` of a detector it searches on validation data
(``APS_mode: True`` in its ``configs/postprocessors/<name>.yml``).
"""

from __future__ import annotations

import jax.numpy as jnp

from ood_jax.scores import bank, boundary, clipping, openmax, posterior, rescaling, rmds, she, vim
from ood_jax.scores.logit import weighted_energy
from ood_jax.scores.registry import ArrayScore, FittedScore


def _fit_temperature(logits, features, labels):
    return posterior.fit_temperature(logits, labels)


def _temperature(params, logits, features, head):
    return posterior.temperature_score(params, logits)


def _fit_kl_matching(logits, features, labels):
    return posterior.fit_kl_matching(logits)


def _kl_matching(params, logits, features, head):
    return posterior.kl_matching_score(params, logits)


def _gen(logits, features, head, *, gamma, m):
    return posterior.gen_score(logits, gamma=gamma, m=m)


def _fit_vim(logits, features, labels, *, dim):
    return vim.fit_vim(logits, features)


def _vim(params, logits, features, head, *, dim):
    # The residual space depends on the head, which fits do not receive: derived here, once.
    subspace = vim.vim_subspace(params, head.kernel, head.bias, dim=dim)
    return vim.vim_score(subspace, logits, features)


def _residual(params, logits, features, head, *, dim):
    subspace = vim.vim_subspace(params, head.kernel, head.bias, dim=dim)
    return vim.residual_score(subspace, features)


def _fit_rmds(logits, features, labels):
    return rmds.fit_rmds(features, labels)


def _rmds(params, logits, features, head):
    return rmds.rmds_score(params, features)


def _fit_nnguide(logits, features, labels, *, k, alpha, seed):
    return bank.fit_nnguide(logits, features, alpha=alpha, seed=seed)


def _nnguide(params, logits, features, head, *, k, alpha, seed):
    return bank.nnguide_score(params, logits, features, k=k)


def _fit_train_mean(logits, features, labels, **hparams):
    return boundary.fit_train_mean(features)


def _fdbd(params, logits, features, head, *, distance_as_normalizer):
    return boundary.fdbd_score(
        params, logits, features, head.kernel, distance_as_normalizer=distance_as_normalizer
    )


def _fit_relation(logits, features, labels, *, power):
    return bank.fit_relation(logits, features)


def _relation(params, logits, features, head, *, power):
    return bank.relation_score(params, logits, features, power=power)


def _nci(params, logits, features, head, *, alpha):
    return boundary.nci_score(params, logits, features, head.kernel, alpha=alpha)


def _fit_she(logits, features, labels):
    return she.fit_she(logits, features, labels)


def _she(params, logits, features, head):
    return she.she_score(params, logits, features)


def _dice(params, logits, features, head, *, percentile):
    return clipping.dice_score(params, features, head.kernel, head.bias, percentile=percentile)


def _fit_vra(logits, features, labels, *, percentile_low, percentile_high):
    return clipping.fit_vra(
        features, percentile_low=percentile_low, percentile_high=percentile_high
    )


def _vra(params, logits, features, head, *, percentile_low, percentile_high):
    return clipping.vra_score(params, features, head.kernel, head.bias)


def _lts(logits, features, head, *, p):
    return rescaling.lts_score(logits, features, p=p)


def _fit_pnml(logits, features, labels):
    return rescaling.fit_pnml(features)


def _pnml(params, logits, features, head):
    return rescaling.pnml_score(params, features, head.kernel, head.bias)


def _fit_openmax(logits, features, labels, *, tailsize, euclid_weight, alpha):
    return openmax.fit_openmax(logits, labels, tailsize=tailsize, euclid_weight=euclid_weight)


def _openmax(params, logits, features, head, *, tailsize, euclid_weight, alpha):
    return openmax.openmax_score(params, logits, alpha=alpha)


def _weighted_energy(logits, features, head, *, weights):
    w = jnp.ones(logits.shape[-1]) if weights is None else jnp.asarray(weights, jnp.float32)
    return weighted_energy(logits, w)


SCORES = (
    FittedScore(
        "fdbd",
        _fdbd,
        "fDBD",
        {"distance_as_normalizer": True},
        fit=_fit_train_mean,
        grid={"distance_as_normalizer": (True, False)},
    ),
    FittedScore("rmds", _rmds, "RMDS", fit=_fit_rmds),
    FittedScore(
        "relation",
        _relation,
        "Relation",
        {"power": 1.0},
        sweep="power",
        sweep_label="pow",
        grid={"power": (1.0, 2.0, 4.0, 6.0, 8.0)},
        fit=_fit_relation,
    ),
    # Not jitted as a whole: the residual space is computed on the host in float64.
    FittedScore(
        "vim", _vim, "ViM", {"dim": 256}, grid={"dim": (256, 1000)}, fit=_fit_vim, jit=False
    ),
    # OpenOOD's residual.yml (dim 512) on a 512-D ResNet-18 becomes 256 by the D // 2 rule.
    FittedScore("residual", _residual, "Residual", {"dim": 512}, fit=_fit_vim, jit=False),
    ArrayScore(
        "gen",
        _gen,
        "GEN",
        {"gamma": 0.1, "m": 100},
        sweep="gamma",
        sweep_label="gamma",
        grid={"gamma": (0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0), "m": (10, 50, 100, 200, 500, 1000)},
    ),
    FittedScore("temp_scale", _temperature, "TempScale", fit=_fit_temperature),
    FittedScore("klm", _kl_matching, "KLM", fit=_fit_kl_matching),
    FittedScore(
        "nnguide", _nnguide, "NNGuide", {"k": 100, "alpha": 0.01, "seed": 0}, fit=_fit_nnguide
    ),
    FittedScore(
        "nci",
        _nci,
        "NCI",
        {"alpha": 1e-4},
        sweep="alpha",
        sweep_label="a",
        grid={"alpha": (1e-4, 1e-3, 1e-2, 1e-1)},
        fit=_fit_train_mean,
    ),
    FittedScore("she", _she, "SHE", fit=_fit_she),
    FittedScore(
        "dice",
        _dice,
        "DICE",
        {"percentile": 90.0},
        sweep="percentile",
        sweep_label="p",
        fit=_fit_train_mean,
    ),
    FittedScore(
        "vra",
        _vra,
        "VRA",
        {"percentile_low": 10.0, "percentile_high": 90.0},
        grid={
            "percentile_low": (1.0, 5.0, 10.0, 15.0),
            "percentile_high": (85.0, 90.0, 95.0, 99.0),
        },
        fit=_fit_vra,
    ),
    ArrayScore("lts", _lts, "LTS", {"p": 0.05}),
    FittedScore("pnml", _pnml, "pNML", fit=_fit_pnml),
    FittedScore(
        "openmax",
        _openmax,
        "OpenMax",
        {"tailsize": 25, "euclid_weight": 1.0, "alpha": 10},
        fit=_fit_openmax,
    ),
    # pytorch-ood webo.py takes the weights VOS trains (no default); None = all ones (= energy).
    # Not jitted: weights given as a list in a config are not hashable static arguments.
    ArrayScore("weighted_energy", _weighted_energy, "WeightedEBO", {"weights": None}, jit=False),
)
