"""The training loop: metrics.jsonl, evaluation, NaN stop keeping the last good checkpoint."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from toy_models import FlatLinear, make_batch

from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer
from ood_jax.train import (
    CheckpointPolicy,
    Evaluation,
    NonFiniteLossError,
    TrainData,
    bind_objective,
    compile_eval_step,
    compile_train_step,
    create_train_state,
    evaluate,
    fit,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
)
from ood_jax.train.logging import read_metrics

IDENTITY = {"name": "flat_linear", "num_classes": 4, "options": {}}


def setup(lr=0.1):
    model = FlatLinear(12, 4, rngs=nnx.Rngs(0))
    schedule = make_schedule(
        "step", base_lr=lr, total_steps=20, steps_per_epoch=4, boundaries_epochs=(1,)
    )
    tx = make_optimizer(schedule, momentum=0.9, weight_decay=0.0)
    model_def, state = create_train_state(model, tx, seed=0)
    mesh = sharding.make_mesh(4)
    step = compile_train_step(
        make_train_step(model_def, tx, bind_objective("ce"), learning_rate=schedule), mesh
    )
    ev = compile_eval_step(make_eval_step(model_def), mesh)
    return model_def, state, mesh, step, ev


def batches(start, *, nan_at=None):
    """Batch s is a pure function of s (like the real iterator); NaN images at nan_at."""
    step = start

    def gen():
        nonlocal step
        while True:
            batch = make_batch(np.random.default_rng(step), 8)
            if step == nan_at:
                batch["image"][:] = np.nan
            step += 1
            yield batch

    return gen()


def test_fit_logs_epochs_evaluates_and_resumes(tmp_path):
    _, state, mesh, step, ev = setup()
    test_set = [make_batch(np.random.default_rng(100 + i), 8) for i in range(2)]
    test_set[1]["mask"][5:] = False
    test_set[1]["label"][5:] = -1
    common = dict(
        train_step=step,
        mesh=mesh,
        data=TrainData(batches, steps_per_epoch=4, batch_size=8),
        workdir=tmp_path,
        checkpoints=CheckpointPolicy(Checkpointer(tmp_path / "ckpt"), model_identity=IDENTITY),
        evaluation=Evaluation(ev, lambda: test_set),
        log_every=3,
        progress=False,
    )
    final, records = fit(state, num_steps=10, **common)
    assert [r["step"] for r in records] == [4, 8, 10]
    assert [r["epoch"] for r in records] == [1.0, 2.0, 2.5]
    # lr of each epoch's last step: 0.1 in epoch 1, then 0.01.
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.01, 0.01])
    on_disk = read_metrics(tmp_path)
    assert on_disk == json.loads(json.dumps(records))
    for key in ("train_loss", "train_accuracy", "logit_norm", "lr", "test_accuracy", "time"):
        assert all(r[key] is not None for r in records), key
    # The logged test accuracy is the accuracy over the 13 real test rows.
    expected = evaluate(ev, final, test_set, mesh)
    assert expected["count"] == 13
    assert records[-1]["test_accuracy"] == pytest.approx(expected["accuracy"])

    # Asking for more steps in the same workdir resumes from step 10 (no re-training).
    _, more = fit(state, num_steps=12, **common)
    assert [r["step"] for r in more] == [12]
    # Epoch 3 (steps 9-12) was resumed at step 10: its record averages 2 of its 4 steps.
    assert more[0]["partial"] is True and more[0]["steps_averaged"] == 2
    assert not any("partial" in r for r in records)
    assert [r["step"] for r in read_metrics(tmp_path)] == [4, 8, 10, 12]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    _, state, mesh, step, _ = setup()
    ckpt = Checkpointer(tmp_path / "ckpt")
    with pytest.raises(NonFiniteLossError, match="at step 6.*newest checkpoint \\(step 4\\)"):
        fit(
            state,
            train_step=step,
            mesh=mesh,
            # NaN in the 6th step.
            data=TrainData(
                lambda start: batches(start, nan_at=5), steps_per_epoch=100, batch_size=8
            ),
            num_steps=20,
            workdir=tmp_path,
            checkpoints=CheckpointPolicy(ckpt, every=2, model_identity=IDENTITY),
            log_every=4,
            progress=False,
        )
    assert ckpt.all_steps() == [2, 4]
    restored, _ = ckpt.restore(jax.tree.map(np.asarray, state))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored.params))


def test_fit_rejects_bad_arguments(tmp_path):
    _, state, mesh, step, _ = setup()
    with pytest.raises(ValueError, match="steps_per_epoch >= 1"):
        fit(
            state,
            train_step=step,
            mesh=mesh,
            data=TrainData(batches, steps_per_epoch=0, batch_size=8),
            num_steps=4,
            workdir=tmp_path,
        )
