"""Helper process for the training tests: trains the tiny model on synthetic data.

Used three ways:

- imported (``run_training``) by the tests, in the pytest process;
- as a subprocess that is killed (SIGKILL) mid-run, to test atomic checkpoints
  and exact resumption;
- as one of N processes of a ``jax.distributed`` run on localhost (CPU
  collectives over gloo), to test multi-process training.

Usage: ``python tests/multiprocess_worker.py --workdir DIR --num_steps N
[--checkpoint_every K] [--step_sleep SEC] [--devices D]
[--process_id I --num_processes P --port PORT] [--out result.npz] [--on_device]``.
"""

from __future__ import annotations

import argparse
import os
import sys

NUM_EXAMPLES = 256
BATCH_SIZE = 32
SEED = 3


def _configure_jax(devices: int) -> None:
    # Must run before JAX initializes its backends.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", devices)


def synthetic_dataset():
    """A fixed random labelled dataset (uint8 images), identical in every process."""
    import numpy as np

    from ood_jax import data as D

    rng = np.random.default_rng(1234)
    images = rng.integers(0, 256, size=(NUM_EXAMPLES, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=NUM_EXAMPLES).astype(np.int32)
    return D.from_arrays(images, labels, name="synthetic", num_classes=10)


def run_training(
    workdir: str,
    *,
    num_steps: int,
    checkpoint_every: int = 0,
    num_devices: int | None = None,
    on_step=None,
    objective: str = "logitnorm",
    lr: float = 0.05,
    use_checkpoints: bool = True,
    on_device: bool = False,
):
    """Train the tiny model (with dropout, augmentation, BatchNorm); returns (state, records).

    ``on_device``: the split placed on the mesh, batches made in the step from the steps'
    plans (``config.data.on_device``), instead of the host pipeline."""
    from flax import nnx

    from ood_jax import data as D
    from ood_jax import sharding
    from ood_jax.checkpoint import Checkpointer
    from ood_jax.data.device import DeviceData, place_split
    from ood_jax.models import create_model
    from ood_jax.train import (
        bind_objective,
        compile_train_step,
        create_train_state,
        make_optimizer,
        make_schedule,
        make_train_step,
    )
    from ood_jax.train.loop import CheckpointPolicy, TrainData, fit

    dataset = synthetic_dataset()
    mesh = sharding.make_mesh(num_devices)
    identity = {"name": "tiny", "num_classes": 10, "options": {"width": 4, "dropout_rate": 0.3}}
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(SEED), **identity["options"])
    steps_per_epoch = NUM_EXAMPLES // BATCH_SIZE
    schedule = make_schedule(
        "step",
        base_lr=lr,
        total_steps=max(num_steps, 1),
        steps_per_epoch=steps_per_epoch,
        boundaries_epochs=(1,),
    )
    tx = make_optimizer(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model_def, state = create_train_state(model, tx, seed=SEED)
    device_data = DeviceData(place_split(dataset, mesh)) if on_device else None
    step = compile_train_step(
        make_train_step(model_def, tx, bind_objective(objective), learning_rate=schedule),
        mesh,
        device_data=device_data,
    )
    batches = D.train_plans if on_device else D.train_iterator
    checkpointer = (
        Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=2)
        if use_checkpoints
        else None
    )
    result = fit(
        state,
        train_step=step,
        mesh=mesh,
        data=TrainData(
            lambda start: batches(dataset, batch_size=BATCH_SIZE, seed=SEED, start_step=start),
            steps_per_epoch=steps_per_epoch,
            batch_size=BATCH_SIZE,
        ),
        num_steps=num_steps,
        workdir=workdir,
        checkpoints=(
            CheckpointPolicy(checkpointer, every=checkpoint_every, model_identity=identity)
            if checkpointer is not None
            else None
        ),
        log_every=1,
        progress=False,
        on_step=on_step,
    )
    if checkpointer is not None:
        checkpointer.close()
    return result


def held_rows(mesh) -> list[list[int]]:
    """``[start, stop)`` of the placed split's rows on each of this process's devices,
    each checked against the dataset (its rows, then the zero rows that pad it)."""
    import numpy as np

    from ood_jax.data.device import IMAGE_BYTES, place_split

    dataset = synthetic_dataset()
    split = place_split(dataset, mesh)
    images = dataset.images.reshape(len(dataset), IMAGE_BYTES)
    out = []
    for shard in split.pixels.addressable_shards:
        start, stop, _ = shard.index[0].indices(split.pixels.shape[0])
        want = np.zeros((stop - start, IMAGE_BYTES), np.uint8)
        real = max(0, min(stop, len(dataset)) - start)
        want[:real] = images[start : start + real]
        assert np.array_equal(np.asarray(shard.data).view(np.uint8), want), (start, stop)
        out.append([start, stop])
    return sorted(out)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_steps", type=int, required=True)
    parser.add_argument("--checkpoint_every", type=int, default=0)
    parser.add_argument("--step_sleep", type=float, default=0.0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--process_id", type=int, default=0)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--on_device", action="store_true", help="data on the device")
    args = parser.parse_args(argv)

    _configure_jax(args.devices)
    import jax

    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"localhost:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    import time

    import numpy as np

    from ood_jax import sharding

    def on_step(done: int) -> None:
        if args.step_sleep:
            time.sleep(args.step_sleep)

    losses: list[float] = []
    state, records = run_training(
        args.workdir,
        num_steps=args.num_steps,
        checkpoint_every=args.checkpoint_every,
        on_step=on_step,
        on_device=args.on_device,
    )
    if args.out and args.on_device:  # every process: the rows its devices hold
        import json

        with open(f"{args.out}.rows{jax.process_index()}.json", "w") as f:
            json.dump(held_rows(sharding.make_mesh()), f)
    if args.out and jax.process_index() == 0:
        leaves = jax.tree_util.tree_flatten_with_path(sharding.fetch(state.params))[0]
        arrays = {jax.tree_util.keystr(path): np.asarray(x) for path, x in leaves}
        losses = [r["train_loss"] for r in records]
        np.savez(args.out, losses=np.asarray(losses), **arrays)
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1:])
