"""Evaluate a training workdir's checkpoint: ``python -m experiments.evaluate --workdir DIR``.

Restores the newest checkpoint of ``DIR/checkpoints`` (or ``--step N``) with
the model and configuration recorded in its metadata, then runs
:func:`ood_jax.evaluate.run_evaluation` on the in-distribution test set of that
configuration and the chosen OOD sets, and writes ``results.json``,
``results.md`` and ``plots/`` to ``DIR/eval`` (``DIR/eval_step<N>`` for an
explicit ``--step``; ``--out_dir`` to choose)::

    python -m experiments.evaluate --workdir /tmp/ln --data_dir ../shared/data \\
        [--step 1560] [--ood_sets tinyimagenet_crop,textures_partial,gaussian] \\
        [--scores msp,energy,odin] [--protocols papers,full] [--convention openood] \\
        [--temperatures 1,1000] [--max_train 10000]

The training experiments call the same :func:`ood_jax.evaluate.run_evaluation`
at the end of training (``--config.eval.ood=true``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
import optax

from experiments.cifar10_train import build_model, load_splits
from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer, CheckpointError, abstract_like
from ood_jax.evaluate import DEFAULT_SCORES, PROTOCOLS, ScoreSettings, run_evaluation
from ood_jax.evaluate.datasets import OFFLINE_OOD_SETS, load_ood_sets
from ood_jax.train import create_train_state, make_optimizer


def restore_model(workdir: str, *, step: int | None = None) -> tuple[Any, dict, int]:
    """``(model in eval mode, checkpoint metadata, step)`` from ``workdir/checkpoints``.

    The model is rebuilt from ``metadata["model"]`` and the optimizer state's
    layout from ``metadata["config"]["optim"]`` (its values are not needed);
    the checkpoint module checks that every saved array matches the model.

    Raises:
      ValueError: no checkpoint directory or no checkpoint, a missing step, or
        a checkpoint that does not match the recorded model.
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise ValueError(
            f"--workdir {workdir!r}: no checkpoints/ folder; pass the workdir of a training run "
            "(python -m experiments.cifar10_logitnorm --workdir DIR)."
        )
    checkpointer = Checkpointer(directory)
    try:
        if step is None:
            step = checkpointer.latest_step()
            if step is None:
                raise CheckpointError(f"--workdir {workdir!r}: {directory} holds no checkpoint.")
        metadata = checkpointer.read_metadata(step)
        identity, config = metadata.get("model"), metadata.get("config")
        if not identity or not config:
            raise CheckpointError(
                f"checkpoint {step} in {directory} has no model/config metadata; it was not "
                "written by the ood_jax training experiments."
            )
        model = build_model(identity, int(config.get("seed", 0)))
        optim = config["optim"]
        # A schedule (any callable) gives the same optimizer-state layout as training.
        tx = make_optimizer(
            optax.constant_schedule(0.0),
            momentum=optim["momentum"],
            nesterov=optim["nesterov"],
            weight_decay=optim["weight_decay"],
        )
        model_def, state = create_train_state(model, tx, seed=0)
        mesh = sharding.make_mesh()
        target = abstract_like(state, sharding.replicated(mesh))
        state, metadata = checkpointer.restore(target, step=step, expected_model=identity)
    finally:
        checkpointer.close()
    params, batch_stats = sharding.fetch((state.params, state.batch_stats))
    model = model_def.merge(params, batch_stats, train=False, key=None)
    return model, metadata, int(step)


def evaluate_workdir(
    workdir: str,
    *,
    step: int | None = None,
    data_dir: str | None = None,
    ood_sets: Sequence[str] = OFFLINE_OOD_SETS,
    scores: Sequence[str] = DEFAULT_SCORES,
    protocols: Sequence[str] = PROTOCOLS,
    convention: str = "hendrycks",
    settings: ScoreSettings | None = None,
    num_draws: int = 10,
    num_synthetic: int = 2000,
    max_train: int | None = None,
    max_ood: int | None = None,
    batch_size: int = 256,
    out_dir: str | None = None,
    command: str = "",
) -> dict:
    """Restores the checkpoint and evaluates it; returns the ``results.json`` dict."""
    default_dir = os.path.join(workdir, "eval" if step is None else f"eval_step{step}")
    model, metadata, step = restore_model(workdir, step=step)
    config = ml_collections.ConfigDict(metadata["config"])
    if data_dir is not None:
        if not os.path.isdir(data_dir):
            raise ValueError(f"--data_dir {data_dir!r} is not a folder.")
        config.data.source = data_dir
    train_ds, test_ds = load_splits(config)
    if max_train is None:
        # Same training subset size as the end-of-training hook (0 = all).
        max_train = config.get("eval", {}).get("max_train") or None
    ood = load_ood_sets(
        ood_sets, data_dir=data_dir, num_synthetic=num_synthetic, seed=config.seed, id_test=test_ds
    )
    return run_evaluation(
        model,
        id_test=test_ds,
        ood_sets=ood,
        train=train_ds,
        scores=scores,
        protocols=protocols,
        convention=convention,
        settings=settings,
        num_draws=num_draws,
        seed=config.seed,
        max_train=max_train,
        max_ood=max_ood,
        batch_size=batch_size,
        out_dir=default_dir if out_dir is None else out_dir,
        metrics_log_dir=workdir,
        metadata={
            "command": command,
            "checkpoint": {"workdir": os.path.abspath(workdir), "step": step},
            "model": metadata["model"],
            "config": metadata["config"],
        },
    )


def _names(text: str) -> list[str]:
    return [t for t in (s.strip() for s in text.split(",")) if t]


def main(argv: Sequence[str] | None = None) -> dict:
    """Command-line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="a training run's workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--data_dir", default=None, help="folder of the offline npz files")
    p.add_argument("--ood_sets", default=",".join(OFFLINE_OOD_SETS), help="comma-separated")
    p.add_argument("--scores", default=",".join(DEFAULT_SCORES), help="comma-separated")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="papers,full")
    p.add_argument("--convention", default="hendrycks", choices=("hendrycks", "openood"))
    p.add_argument("--temperatures", default="1", help="MSP/energy sweep, e.g. 1,10,1000")
    p.add_argument("--odin_temperature", type=float, default=1000.0)
    p.add_argument("--odin_epsilon", type=float, default=0.0014)
    p.add_argument(
        "--odin_max_examples", type=int, default=None, help="ODIN on N random images per set"
    )
    p.add_argument("--knn_k", type=int, default=50)
    p.add_argument(
        "--knn_max_train", type=int, default=None, help="KNN bank: N random train features"
    )
    p.add_argument("--num_draws", type=int, default=10)
    p.add_argument("--num_synthetic", type=int, default=2000, help="images per synthetic set")
    p.add_argument(
        "--max_train",
        type=int,
        default=None,
        help="fit scores on N train images (default: the run's config.eval.max_train)",
    )
    p.add_argument("--max_ood", type=int, default=None, help="subsample each OOD set to N")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--out_dir", default=None)
    args = p.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.evaluate", *(argv or sys.argv[1:])])
    try:
        temperatures = tuple(float(t) for t in _names(args.temperatures))
    except ValueError as err:
        raise ValueError(f"--temperatures must be numbers, got {args.temperatures!r}.") from err
    settings = ScoreSettings(
        temperatures=temperatures,
        odin_temperature=args.odin_temperature,
        odin_epsilon=args.odin_epsilon,
        odin_max_examples=args.odin_max_examples,
        knn_k=args.knn_k,
        knn_max_train=args.knn_max_train,
    )
    results = evaluate_workdir(
        args.workdir,
        step=args.step,
        data_dir=args.data_dir,
        ood_sets=_names(args.ood_sets),
        scores=_names(args.scores),
        protocols=_names(args.protocols),
        convention=args.convention,
        settings=settings,
        num_draws=args.num_draws,
        num_synthetic=args.num_synthetic,
        max_train=args.max_train,
        max_ood=args.max_ood,
        batch_size=args.batch_size,
        out_dir=args.out_dir,
        command=command,
    )
    print(f"wrote {results['report_dir']}")
    return results


if __name__ == "__main__":
    main()
