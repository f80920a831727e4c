"""experiments.workdir.Workdir: a run's files, its lock and its one checkpointer."""

import json
import os

import ml_collections
import pytest
from flax import nnx

from experiments import cli
from experiments.workdir import Workdir
from ood_jax.checkpoint import CheckpointError
from ood_jax.models import create_model
from ood_jax.train import create_train_state, make_optimizer

IDENTITY = {"name": "tiny", "num_classes": 10, "options": {"width": 4}}


def _config(lr=0.1):
    return ml_collections.ConfigDict(
        {"seed": 0, "optim": {"lr": lr}, "train": {"allow_changes": False}}
    )


def _saved_run(path):
    """A workdir with one checkpoint (step 3) of the tiny model and its config."""
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(0), width=4)
    state = create_train_state(model, make_optimizer(0.1), seed=0)[1]
    with Workdir(path) as run:
        run.checkpointer.save(3, state, {"model": IDENTITY, "config": _config().to_dict()})


def test_a_fresh_workdir_is_not_touched_before_it_is_locked(tmp_path):
    run = Workdir(tmp_path / "run")
    assert run.newest_metadata() == (None, None)
    run.check_resume(_config(), IDENTITY)
    run.close()
    assert not os.path.exists(tmp_path / "run")


def test_one_checkpointer_reads_the_metadata_once(tmp_path, monkeypatch):
    _saved_run(tmp_path)
    with Workdir(tmp_path) as run:
        checkpointer = run.checkpointer
        reads = []
        restore = checkpointer._manager.restore
        monkeypatch.setattr(
            checkpointer._manager, "restore", lambda *a, **k: reads.append(a) or restore(*a, **k)
        )
        assert run.newest_metadata()[0] == 3
        run.check_resume(_config(), IDENTITY)
        step, metadata = run.newest_metadata()
        assert run.checkpointer is checkpointer
    assert (step, metadata["model"]) == (3, IDENTITY)
    assert len(reads) == 1  # three look-ups, one read from disk


def test_resume_checks_the_model_then_the_settings(tmp_path):
    _saved_run(tmp_path)
    other = {**IDENTITY, "options": {"width": 8}}
    with Workdir(tmp_path) as run, pytest.raises(CheckpointError, match="of another model"):
        run.check_resume(_config(lr=0.5), other)
    with Workdir(tmp_path) as run, pytest.raises(cli.UsageError, match="optim.lr: 0.1 -> 0.5"):
        run.check_resume(_config(lr=0.5), IDENTITY)
    allowed = _config(lr=0.5)
    allowed.train.allow_changes = True
    with Workdir(tmp_path) as run:
        run.check_resume(allowed, IDENTITY)
    with open(tmp_path / Workdir.CHANGES) as f:
        assert [json.loads(line) for line in f] == [
            {"step": 3, "changes": {"optim.lr": [0.1, 0.5]}}
        ]


def test_the_lock_refuses_a_second_run_until_closed(tmp_path):
    first = Workdir(tmp_path)
    first.lock()
    with pytest.raises(cli.UsageError, match=f"another run \\(process {os.getpid()}\\)"):
        Workdir(tmp_path).lock()
    first.close()
    second = Workdir(tmp_path)
    second.lock()
    second.close()
