"""The adversarial-noise OOD set of the ACET paper: uniform noise attacked against the model.

Uniform noise in ``[0, 1]`` is attacked with :func:`ood_jax.attacks.pgd_confidence`
(L-infinity, radius 0.3, 40 steps by default, maximizing confidence) against
the model being evaluated, in evaluation mode. The result is float images (an
attack's small steps would not survive rounding to uint8), kept as
:class:`FloatImages` and evaluated like any OOD set. The noise and every
batch's random start are seeded by the evaluation seed and the set's name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ood_jax import attacks
from ood_jax.evaluate.forward import ForwardPass
from ood_jax.evaluate.protocol import dataset_seeds

NAME = "adversarial_noise"
# PGD steps per call, and images per attacked batch: memory grows with both
# (unrolled steps keep their buffers), time per image does not.
CHUNK_STEPS = 8
ATTACK_BATCH = 128


@dataclasses.dataclass(frozen=True, eq=False)
class FloatImages:
    """An OOD set of normalized float images ``[N, H, W, C]`` (no labels)."""

    images: np.ndarray
    name: str
    source: str

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        """Padded, masked batches in order (the shape ``eval_batches`` yields)."""
        for lo in range(0, len(self), batch_size):
            part = self.images[lo : lo + batch_size]
            real = part.shape[0]
            image = np.zeros((batch_size, *part.shape[1:]), np.float32)
            image[:real] = part
            yield {
                "image": image,
                "label": np.full(batch_size, -1, np.int32),
                "mask": np.arange(batch_size) < real,
            }

    def head(self, size: int | None) -> FloatImages:
        """The first ``size`` images (the noise is i.i.d.: a random subset)."""
        if not size or len(self) <= size:
            return self
        return FloatImages(self.images[:size], self.name, f"{self.source} (first {size})")


@dataclasses.dataclass(frozen=True)
class NoiseAttack:
    """The attack's jitted calls with the model bound in (:meth:`ForwardPass.bind`).

    ``start(images01, key_data) -> PGDState``; ``advance[n](state)``: ``n <=
    CHUNK_STEPS`` steps, unrolled (on CPU) or a loop (``unrolled``); ``finish(state) ->
    normalized images``; ``batch``: images per call. Each call's ``.jitted`` is its
    ``jax.jit`` (a compile-only plan lowers them).
    """

    start: Callable
    advance: Mapping[int, Callable]
    finish: Callable
    batch: int
    unrolled: bool


def noise_attack(
    forward: ForwardPass,
    num: int,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float,
    steps: int,
    batch_size: int,
) -> NoiseAttack:
    """The calls :func:`adversarial_noise` runs to attack ``num`` images (see there)."""
    pixel_mean = jnp.asarray(mean, jnp.float32)
    pixel_std = jnp.asarray(std, jnp.float32)
    alpha = eps / max(steps, 1)

    def logits_01(apply_logits):
        return lambda u: apply_logits((u - pixel_mean) / pixel_std)

    # The attack runs in chunks of at most CHUNK_STEPS unrolled steps, each its own
    # call: unrolled steps are fast on CPU but keep every step's buffers, so 40 steps
    # in one call of a batch of 500 need about 24 GB. Unrolled on the mesh's platform's
    # terms (pgd_advance's default asks the default backend, which for a compile-only
    # TPU mesh is the CPU).
    unroll = forward.mesh.devices.flat[0].platform == "cpu"
    start = forward.bind(lambda apply, images01, key: attacks.pgd_start(images01, key, eps=eps))
    advance = {
        n: forward.bind(
            lambda apply, state, n=n: attacks.pgd_advance(
                logits_01(apply), state, eps=eps, step_size=alpha, steps=n, unroll=unroll
            )
        )
        for n in {min(CHUNK_STEPS, steps), steps % CHUNK_STEPS} - {0}
    }
    finish = forward.bind(
        lambda apply, state: (attacks.pgd_finish(logits_01(apply), state) - pixel_mean) / pixel_std
    )
    size = -(-min(batch_size, ATTACK_BATCH, num) // forward.num_shards) * forward.num_shards
    return NoiseAttack(start, advance, finish, size, unroll)


def adversarial_noise(
    forward: ForwardPass,
    num: int,
    *,
    seed: int,
    mean: Sequence[float],
    std: Sequence[float],
    eps: float = 0.3,
    steps: int = 40,
    batch_size: int = 256,
    image_shape: tuple[int, int, int] = (32, 32, 3),
) -> FloatImages:
    """``num`` uniform-noise images attacked to maximize ``forward``'s model's confidence."""
    if num < 1 or steps < 0 or eps < 0:
        raise ValueError(
            f"adversarial_noise: need num >= 1, steps >= 0, eps >= 0; got {num}, {steps}, {eps}."
        )
    attack = noise_attack(
        forward, num, mean=mean, std=std, eps=eps, steps=steps, batch_size=batch_size
    )
    rng = np.random.default_rng(dataset_seeds(seed, NAME))
    noise = rng.uniform(0.0, 1.0, (num, *image_shape)).astype(np.float32)
    size = attack.batch
    root = jax.random.key(int(rng.integers(2**31)))
    out = []
    for i, lo in enumerate(range(0, num, size)):
        part = noise[lo : lo + size]
        padded = np.zeros((size, *image_shape), np.float32)
        padded[: len(part)] = part
        key = jax.random.key_data(jax.random.fold_in(root, i))
        state = attack.start(padded, key)
        for done in range(0, steps, CHUNK_STEPS):
            state = attack.advance[min(CHUNK_STEPS, steps - done)](state)
        out.append(np.asarray(attack.finish(state))[: len(part)])
    source = (
        f"uniform noise attacked against this model: L-inf PGD eps {eps}, {steps} steps, "
        f"maximizing confidence (seed {dataset_seeds(seed, NAME)})"
    )
    return FloatImages(np.concatenate(out), NAME, source)
