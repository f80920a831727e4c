"""Virtual-logit matching (ViM, Wang et al., CVPR 2022): energy minus the residual norm.

Also the paper's "Residual" baseline, the residual norm alone.

The residual space is that of the training features around the origin
``u = -W^+ b`` where the head's logits vanish, so it depends on the head. The
evaluation's ``fit`` does not receive the head; :func:`fit_vim` therefore keeps
the training features and :func:`vim_subspace` derives the residual space from
them and the head (host, float64, once per scoring call);
:func:`vim_score` is the pure jitted score.
"""

from __future__ import annotations

import numbers

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ood_jax.scores.fitted import HIGHEST, _check_unused_labels, _score_features, _train_features
from ood_jax.scores.logit import _as_float, energy

__all__ = ["ViMParams", "ViMSubspace", "fit_vim", "residual_score", "vim_score", "vim_subspace"]


@flax.struct.dataclass
class ViMParams:
    """What ViM keeps of the training set.

    Attributes:
      train_features: ``[N, D]`` float32 training features.
      mean_max_logit: scalar mean over the training set of ``max_k f_k``.
    """

    train_features: jax.Array
    mean_max_logit: jax.Array


@flax.struct.dataclass
class ViMSubspace:
    """ViM's residual space for one head and dimension.

    Attributes:
      origin: ``[D]`` ``u = -W^+ b``.
      residual: ``[D, D - dim]`` orthonormal basis of the residual space.
      alpha: scalar ``mean max logit / mean residual norm`` over the training set.
    """

    origin: jax.Array
    residual: jax.Array
    alpha: jax.Array


def fit_vim(
    train_logits: ArrayLike, train_features: ArrayLike, train_labels: ArrayLike | None = None
) -> ViMParams:
    """Keeps the training features and their mean maximum logit (labels ignored)."""
    x = _train_features(train_features, np.float32)
    _check_unused_labels(train_labels, x.shape[0])
    f = _train_features(train_logits)
    return ViMParams(
        train_features=jnp.asarray(x), mean_max_logit=jnp.asarray(f.max(axis=1).mean(), jnp.float32)
    )


def vim_subspace(
    params: ViMParams, head_kernel: ArrayLike, head_bias: ArrayLike | None, *, dim: int = 256
) -> ViMSubspace:
    r"""ViM's origin, residual space and scale ``alpha`` (host, float64).

    .. math:: u = -W^{+} b, \qquad
        \Sigma = \tfrac{1}{N} \textstyle\sum_i (z_i - u)(z_i - u)^\top, \qquad
        \alpha = \frac{\operatorname{mean}_i \max_k f_k(x_i)}
                      {\operatorname{mean}_i \lVert (z_i - u)^\top R \rVert}

    with ``R`` the eigenvectors of ``Sigma`` beyond its ``dim`` largest
    eigenvalues. ``dim = 256`` is OpenOOD v1.5's CIFAR default
    (``configs/postprocessors/vim.yml``); as in pytorch-ood 0.4
    (``detector/vim.py``), a ``dim`` not below ``D`` becomes ``D // 2``.

    Args:
      params: from :func:`fit_vim`.
      head_kernel: ``[D, K]``.
      head_bias: ``[K]`` or ``None`` (then ``u = 0``).
      dim: dimension of the principal space, ``>= 1``.

    Returns:
      :class:`ViMSubspace` for :func:`vim_score`.
    """
    if not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be a positive integer, got {dim!r}.")
    x = np.asarray(params.train_features, np.float64)
    kernel = np.asarray(head_kernel, np.float64)
    if kernel.shape[0] != x.shape[1]:
        raise ValueError(f"head_kernel must have shape [{x.shape[1]}, K], got {kernel.shape}.")
    bias = np.zeros(kernel.shape[1]) if head_bias is None else np.asarray(head_bias, np.float64)
    dim = dim if dim < x.shape[1] else x.shape[1] // 2
    origin = -np.linalg.pinv(kernel.T) @ bias
    centered = x - origin
    eigvals, eigvecs = np.linalg.eigh(centered.T @ centered / x.shape[0])
    residual = np.ascontiguousarray(eigvecs[:, np.argsort(-eigvals)[dim:]])
    alpha = float(params.mean_max_logit) / np.linalg.norm(centered @ residual, axis=1).mean()
    return ViMSubspace(
        origin=jnp.asarray(origin, jnp.float32),
        residual=jnp.asarray(residual, jnp.float32),
        alpha=jnp.asarray(alpha, jnp.float32),
    )


@jax.jit
def vim_score(subspace: ViMSubspace, logits: ArrayLike, features: ArrayLike) -> jax.Array:
    r"""ViM's score: energy minus the scaled residual norm (the virtual logit).

    .. math:: s(x) = \log \sum_k e^{f_k(x)} - \alpha \lVert (z - u)^\top R \rVert

    pytorch-ood clips the logits to ``[-100, 100]`` before the energy; OpenOOD
    and this function do not.

    Args:
      subspace: from :func:`vim_subspace`.
      logits: ``[..., K]``.
      features: ``[..., D]``.

    Returns:
      ``[...]`` float32 scores.
    """
    return energy(_as_float(logits, "logits")) + subspace.alpha * residual_score(subspace, features)


@jax.jit
def residual_score(subspace: ViMSubspace, features: ArrayLike) -> jax.Array:
    r"""Negative norm of the features' residual (OpenOOD v1.5 ``residual_postprocessor.py``).

    .. math:: s(z) = -\lVert (z - u)^\top R \rVert

    ViM's virtual logit without the energy and ``alpha`` (Wang et al., CVPR 2022, "Residual").

    Args:
      subspace: from :func:`vim_subspace` (its ``alpha`` is not used).
      features: ``[..., D]``.

    Returns:
      ``[...]`` float32 scores (``<= 0``).
    """
    z = _score_features(features, subspace.origin.shape[0])
    residual = jnp.matmul(z - subspace.origin, subspace.residual, precision=HIGHEST)
    return -jnp.linalg.norm(residual, axis=-1)
