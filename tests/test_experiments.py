"""The CIFAR-10 experiments: presets, command-line overrides, and the smoke run end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from experiments.cifar10_train import apply_overrides, model_identity, train_and_evaluate

from experiments.configs import cifar10 as presets
from ood_jax.checkpoint import CheckpointError
from ood_jax.train.logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_easy_cifar(folder, *, seed=0):
    """cifar10_{train,test}.npz (decoded format) whose class is the image's mean colour."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(10, 3))
    for split, n in (("train", 1200), ("test", 600)):
        labels = rng.integers(0, 10, n).astype(np.int32)
        noise = rng.integers(-25, 26, size=(n, 32, 32, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        np.savez(folder / f"cifar10_{split}.npz", images=images, labels=labels)


def test_paper_preset_records_the_papers_hyperparameters():
    c = presets.get_config("paper", "logitnorm")
    assert (c.model.name, c.model.options.dropout_rate) == ("wrn40_2", 0.3)
    assert (c.train.epochs, c.train.batch_size) == (200, 128)
    assert (c.optim.lr, c.optim.schedule, tuple(c.optim.boundaries_epochs)) == (
        0.1,
        "step",
        (80, 140),
    )
    assert (c.optim.decay_factor, c.optim.weight_decay) == (0.1, 5e-4)
    assert (c.optim.momentum, c.optim.nesterov) == (0.9, True)
    assert c.objective.hparams.temperature == 0.04
    assert presets.get_config("paper", "ce").objective.hparams.to_dict() == {}
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get_config("huge")


def test_overrides_parse_types_and_reject_unknown_fields():
    c = presets.get_config("smoke", "logitnorm")
    apply_overrides(
        c,
        [
            "--config.optim.lr=1",
            "--config.train.progress=false",
            "--config.optim.boundaries_epochs=(40, 50)",
            "--config.model.name=resnet18",
            "--config.model.options.width=16",
            "--config.objective.hparams.temperature=0.01",
        ],
    )
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.progress is False
    assert tuple(c.optim.boundaries_epochs) == (40, 50)
    assert c.model.name == "resnet18"
    assert c.model.options.width == 16
    assert c.objective.hparams.temperature == 0.01
    with pytest.raises(ValueError, match="no field 'lrr'"):
        apply_overrides(c, ["--config.optim.lrr=0.1"])
    with pytest.raises(ValueError, match="unrecognized argument"):
        apply_overrides(c, ["--lr=0.1"])


def test_model_identity_includes_objective_and_precision_options():
    c = presets.get_config("paper", "ce")
    c.objective.name = "feature_norm"
    c.model.mixed_precision = True
    identity = model_identity(c, 10)
    assert identity == {
        "name": "wrn40_2",
        "num_classes": 10,
        "options": {"dropout_rate": 0.3, "normalize_features": True, "dtype": "bfloat16"},
    }


@pytest.mark.slow
def test_smoke_experiment_end_to_end(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_easy_cifar(data)
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cifar10_logitnorm",
            "--workdir",
            str(workdir),
            "--preset",
            "smoke",
            "--data",
            str(data),
            "--config.train.progress=false",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    final = json.loads((workdir / "final.json").read_text())
    assert final["step"] == 2 * (1024 // 64)
    assert final["test_examples"] == 512
    assert final["test_accuracy"] > 0.5  # 10 colour classes: chance is 0.1
    records = read_metrics(workdir)
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    assert all(r["logit_norm"] > 0 and r["test_accuracy"] is not None for r in records)
    assert records[-1]["test_accuracy"] == pytest.approx(final["test_accuracy"])
    config = json.loads((workdir / "config.json").read_text())
    assert config["objective"] == {"name": "logitnorm", "hparams": {"temperature": 0.04}}
    assert os.listdir(workdir / "checkpoints")

    # The same workdir with another model configuration: a clear error, no retraining.
    other = presets.get_config("smoke", "logitnorm")
    other.data.source = str(data)
    other.model.options.width = 16
    other.train.progress = False
    with pytest.raises(CheckpointError, match="of another model"):
        train_and_evaluate(other, workdir)
