"""Monte Carlo dropout (Gal & Ghahramani, ICML 2016): dropout on at test time.

The model runs ``samples`` times on each batch with its dropout layers active
(BatchNorm on its running statistics, as pytorch-ood's ``MCD(batch_norm=True)``),
each pass seeded by its own key; the score is

- ``mode="mean"``: the maximum of the mean softmax, ``max_k (1/S) Σ_s softmax(f_s)_k``
  (pytorch-ood ``mean`` mode, negated there as an outlier score);
- ``mode="var"``: minus the per-class variance of the softmax over the passes
  (Bessel's ``S - 1``), averaged over the classes (pytorch-ood ``var`` mode).

References: pytorch-ood 0.4 ``src/pytorch_ood/detector/mcd.py`` (``samples=30``),
OpenOOD v1.5 ``openood/postprocessors/dropout_postprocessor.py`` (5 passes, the softmax
of the *mean logits*, on a network whose only dropout is its ``DropoutNet`` wrapper).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from ood_jax import rng as rng_lib
from ood_jax.scores.registry import ImageScore

MODES = ("mean", "var")


def mc_dropout(
    apply_dropout: Callable[[jax.Array, jax.Array], jax.Array],
    images: jax.Array,
    key: jax.Array,
    *,
    samples: int,
    mode: str = "mean",
) -> jax.Array:
    """``[B]`` MC-dropout scores (higher = more in-distribution) of ``images``.

    Args:
      apply_dropout: ``(images [B, ...], key) -> logits [B, K]`` with dropout active.
      images: ``[B, H, W, C]`` normalized images.
      key: raw ``uint32[2]`` key; pass ``s`` uses ``fold_in(key, s)``.
      samples: number of passes ``S`` (``>= 2`` for ``"var"``).
      mode: ``"mean"`` or ``"var"`` (module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}.")
    if samples < (2 if mode == "var" else 1):
        raise ValueError(f"samples: expected at least {2 if mode == 'var' else 1}, got {samples}.")
    keys = jax.vmap(lambda s: rng_lib.step_key(key, s))(jnp.arange(samples))
    # One pass at a time (lax.map): memory of one forward pass, one compiled body.
    probs = jax.lax.map(
        lambda k: jax.nn.softmax(apply_dropout(images, k).astype(jnp.float32), axis=-1), keys
    )
    if mode == "mean":
        return probs.mean(axis=0).max(axis=-1)
    return -probs.var(axis=0, ddof=1).mean(axis=-1)


def _mc_dropout(apply_dropout, images, std, key, *, samples, mode, seed, max_examples):
    return mc_dropout(apply_dropout, images, key, samples=samples, mode=mode)


# samples: pytorch-ood's 30; mode "mean": the confidence both references report (pytorch-ood's
# default is "var"); seed: of the passes' keys; max_examples: a CPU budget, as ODIN's.
SCORES = (
    ImageScore(
        "mc_dropout",
        _mc_dropout,
        "MC Dropout",
        {"samples": 30, "mode": "mean", "seed": 0, "max_examples": None},
        stochastic=True,
    ),
)
