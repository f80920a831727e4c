"""What a user writes to extend ood_jax: one objective, one score, one dataset.

Lives outside the package (imported by name through ``--config.imports`` /
``--imports``), exactly as docs/architecture.md shows. The tests train, score
and report with these through the command line.
"""

import jax.numpy as jnp
import numpy as np

from ood_jax import data, losses
from ood_jax.scores import register_score
from ood_jax.train import Loss, register_objective


@register_objective("scaled_ce", defaults={"scale": 1.0})
def scaled_ce(apply, batch, aux, key, *, scale):
    """Cross-entropy times a constant (a test objective: gradients scale with it)."""
    logits, _ = apply(batch["image"])
    return Loss(scale * losses.cross_entropy(logits, batch["label"]), logits, {"scale": scale})


@register_score("neg_feature_norm", consumes="outputs", display="-FeatureNorm")
def neg_feature_norm(logits, features, head):
    """Minus the feature norm: ranks every pair opposite to the feature-norm score."""
    return -jnp.linalg.norm(features, axis=-1)


def _stripes(split, *, limit=None, data_dir=None):
    n = 48 if limit is None else min(limit, 48)
    images = np.zeros((n, 32, 32, 3), np.uint8)
    images[:, ::2] = 255  # horizontal stripes, far from anything natural
    images[:, :, :, 1] = np.arange(n, dtype=np.uint8)[:, None, None] * 5
    return data.from_arrays(images, name="stripes", source="generated stripes")


data.register_dataset(data.DatasetSpec("stripes", "Stripes", 0, loader=_stripes))
