"""Automatic hyperparameters of fine-tuning: the energy margins from the initial model."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from experiments import cli
from ood_jax import data as D
from ood_jax import sharding

AUTO_HPARAMS = ("m_in", "m_out")
_AUTO_EXAMPLES = 10000


def mean_energy(model_def, params, batch_stats, dataset, *, mean, std, batch_size, mesh) -> float:
    """Mean free energy ``-logsumexp(logits)`` of the model (eval mode) over ``dataset``."""
    from ood_jax.evaluate import ForwardPass

    model = model_def.merge(params, batch_stats, train=False, key=None)
    outputs = ForwardPass(model, mesh=mesh)(
        D.eval_batches(dataset, batch_size=batch_size, mean=mean, std=std)
    )
    logits = outputs.logits.astype("float64")
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(-lse.mean())


def check_auto_hparams(config: ml_collections.ConfigDict) -> None:
    """``config.objective.auto`` names margins of the objective, and there is a model to
    measure them on (``--init_from``); before anything is written."""
    unknown = sorted(set(config.objective.auto) - set(AUTO_HPARAMS))
    if unknown or not set(config.objective.auto) <= set(config.objective.hparams):
        raise cli.UsageError(
            f"config.objective.auto: can set {AUTO_HPARAMS} of an objective that has them, "
            f"got {tuple(config.objective.auto)} for {config.objective.name!r}."
        )
    if not config.train.init_from:
        raise cli.UsageError(
            "automatic margins are measured on the model being fine-tuned: pass --init_from."
        )


# Every argument is one measurement input (model, weights, both sets, normalization,
# batching, mesh, what the run recorded): one fewer would hide where a margin comes from.
def set_auto_hparams(
    config: ml_collections.ConfigDict,
    model_def: Any,
    state: Any,
    train_ds: D.ImageDataset,
    outliers: D.ImageDataset | None,
    *,
    recorded: dict[str, Any] | None,
    mesh: Any,
    mean: Any,
    std: Any,
    batch_size: int,
) -> dict[str, float]:
    """The ``config.objective.auto`` hyperparameters from the initial model.

    ``m_in`` / ``m_out``: the model's mean free energy on (a seeded subset of at most
    10,000 of) the in-distribution training images and the auxiliary outliers: the
    energy authors' advice for choosing the margins. A resumed run reuses the values
    its own checkpoint recorded (``recorded``: that checkpoint's metadata, or None).
    :func:`check_auto_hparams` has checked the config.
    """
    saved = recorded["config"]["objective"]["hparams"] if recorded else None
    sets = {"m_in": train_ds, "m_out": outliers}
    values = {}
    for name in config.objective.auto:
        if saved is not None:
            values[name] = float(saved[name])
            continue
        if sets[name] is None:
            raise cli.UsageError(f"{name}=auto needs the auxiliary outliers of the objective.")
        subset = D.random_subset(sets[name], _AUTO_EXAMPLES, seed=config.seed)
        values[name] = mean_energy(
            model_def,
            *sharding.fetch((state.params, state.batch_stats)),
            subset,
            mean=mean,
            std=std,
            batch_size=batch_size,
            mesh=mesh,
        )
    print(
        "automatic margins from the initial model's mean energies: "
        + ", ".join(f"{k} = {v:.4f}" for k, v in values.items())
    )
    return values
