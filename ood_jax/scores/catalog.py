"""The built-in scores and their order: :data:`ORDER`, the order of the report.

Each module that defines built-in scores declares them in a ``SCORES`` tuple and
registers nothing; this module registers them all, in :data:`ORDER`, when
:mod:`ood_jax.scores` is imported (it imports this module first). So
:func:`~ood_jax.scores.available_scores` lists the built-ins in :data:`ORDER`
whichever module was imported first, then the scores registered elsewhere, in
registration order. A new built-in goes into its module's ``SCORES`` and into
:data:`ORDER` (import fails while the two differ).
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from ood_jax.scores import builtin_entries, dropout, gram, mds, posthoc_entries, shaping
from ood_jax.scores.registry import Score, register_score

# The report's order: results.md, the plots and the default --scores follow it.
ORDER: tuple[str, ...] = (
    # builtin_entries: logits and features, ODIN, GradNorm, the first fitted scores
    "msp",
    "max_logit",
    "energy",
    "neg_entropy",
    "feature_norm",
    "odin",
    "gradnorm",
    "mahalanobis",
    "knn",
    "gmm",
    "mahalanobis_l2",
    "gmm_l2",
    "react",
    # shaping: ASH and SCALE on the features, then on the feature map; RankFeat
    "ash_p",
    "ash_b",
    "ash_s",
    "scale",
    "ash_p_map",
    "ash_b_map",
    "ash_s_map",
    "scale_map",
    "rankfeat",
    "rankfeat_fused",
    # posthoc_entries: the post-hoc detectors of docs/detectors.md
    "fdbd",
    "rmds",
    "relation",
    "vim",
    "residual",
    "gen",
    "temp_scale",
    "klm",
    "nnguide",
    "nci",
    "she",
    "dice",
    "vra",
    "lts",
    "pnml",
    "openmax",
    "weighted_energy",
    # the model scores of their own modules: dropout, gram, mds
    "mc_dropout",
    "gram",
    "mahalanobis_odin",
    "mds_ensemble",
)

_MODULES = (builtin_entries, shaping, posthoc_entries, dropout, gram, mds)

# What each built-in needs from the model beyond its logits (``Score.needs``), where
# that differs from its kind's default: the array and fitted scores of the logits alone,
# those of the features without the head, and Mahalanobis+ODIN (an image score whose
# fit and score read the features). A model that cannot serve a need (a logits-only
# model has no features; a model without ``capture=`` no intermediates) is evaluated
# without those scores, each skipped with a warning.
NEEDS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        (
            "msp",
            "max_logit",
            "energy",
            "neg_entropy",
            "gen",
            "temp_scale",
            "klm",
            "openmax",
            "weighted_energy",
        ),
        (),
    ),
    **dict.fromkeys(
        (
            "feature_norm",
            "mahalanobis",
            "knn",
            "gmm",
            "mahalanobis_l2",
            "gmm_l2",
            "rmds",
            "relation",
            "nnguide",
            "she",
            "lts",
            "mahalanobis_odin",
        ),
        ("features",),
    ),
}


def builtin_scores() -> tuple[Score, ...]:
    """Every built-in score, in :data:`ORDER`."""
    scores = [score for module in _MODULES for score in module.SCORES]
    declared, ordered = Counter(score.name for score in scores), Counter(ORDER)
    if declared != ordered:
        raise ValueError(
            "catalog: ORDER and the modules' SCORES differ: declared, not in ORDER "
            f"{sorted((declared - ordered).elements())}; in ORDER, not declared "
            f"{sorted((ordered - declared).elements())} (a name twice counts twice)."
        )
    by_name = {score.name: score for score in scores}
    unknown = sorted(set(NEEDS) - set(ORDER))
    if unknown:
        raise ValueError(f"catalog: NEEDS names scores not in ORDER: {unknown}.")
    return tuple(
        dataclasses.replace(by_name[name], needs=NEEDS[name]) if name in NEEDS else by_name[name]
        for name in ORDER
    )


for _score in builtin_scores():
    register_score(_score)
