"""``python -m experiments.evaluate`` on a workdir written by the training experiment."""

import json
import os

import numpy as np
import pytest
from experiments.cifar10_train import train_and_evaluate
from flax import nnx

from experiments import evaluate as cli
from experiments.configs import cifar10 as presets
from ood_jax.checkpoint import CheckpointError
from ood_jax.models import create_model

pytestmark = pytest.mark.slow


def _write_split(folder, split, n, seed):
    """CIFAR-like decoded npz: class c = noisy images around one colour per class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    colours = np.random.default_rng(0).integers(0, 256, (10, 3))
    images = colours[labels][:, None, None, :] + rng.normal(0, 20, (n, 32, 32, 3))
    np.savez(
        folder / f"cifar10_{split}.npz",
        images=np.clip(images, 0, 255).astype(np.uint8),
        labels=labels,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    _write_split(data, "train", 128, seed=1)
    _write_split(data, "test", 64, seed=2)
    config = presets.get_config("smoke", "logitnorm")
    config.data.source = str(data)
    config.data.train_limit = 0
    config.data.test_limit = 0
    config.data.eval_batch_size = 64
    config.train.batch_size = 32
    config.train.epochs = 1  # 4 steps, one checkpoint
    config.train.progress = False
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, workdir)
    return workdir, data


ARGS = [
    "--ood_sets=gaussian,blobs",
    "--num_synthetic=24",
    "--max_ood=20",
    "--odin_max_examples=16",
    "--scores=msp,energy,mahalanobis,odin",
    "--num_draws=2",
    "--batch_size=32",
]


def test_cli_writes_report_for_latest_checkpoint(workdir):
    run, data = workdir
    results = cli.main([f"--workdir={run}", f"--data_dir={data}", *ARGS])
    report = run / "eval"
    on_disk = json.loads((report / "results.json").read_text())
    assert on_disk["complete"] and on_disk["checkpoint"]["step"] == 4
    assert on_disk["model"]["name"] == "tiny" and on_disk["config"]["preset"] == "smoke"
    assert on_disk["command"].startswith("python -m experiments.evaluate --workdir=")
    assert list(on_disk["ood"]) == ["papers", "full"]
    assert set(on_disk["ood"]["full"]["metrics"]["odin"]) == {"gaussian", "blobs", "average"}
    assert on_disk["data"]["id"]["num_examples"] == 64
    gaussian = on_disk["data"]["ood"]["gaussian"]
    assert gaussian["num_examples"] == 20 and "random 20 of 24" in gaussian["source"]
    # ODIN on 16-image subsets of every set; its draws are recorded apart.
    assert on_disk["odin_examples"] == {"id": 16, "ood/gaussian": 16, "ood/blobs": 16}
    assert on_disk["ood"]["papers"]["odin_draws"]["blobs"]["num_examples"] == 12  # 64 // 5
    assert "ODIN on seeded random subsets" in (report / "results.md").read_text()
    # The logit-norm curve comes from the training run's metrics.jsonl.
    assert on_disk["diagnostics"]["logit_norm_curve"]["logit_norm"]["step"] == [4.0]
    assert (report / "plots" / "logit_norm.png").exists()
    assert "Energy" in (report / "results.md").read_text()
    # The restored model reproduces the training run's final test accuracy.
    final = json.loads((run / "final.json").read_text())
    assert results["classification"]["accuracy"] == pytest.approx(final["test_accuracy"])


def test_missing_step(workdir):
    run, data = workdir
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        cli.main([f"--workdir={run}", f"--data_dir={data}", "--step=7", *ARGS])
    assert not (run / "eval_step7").exists()


def test_workdir_without_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="no checkpoints/ folder"):
        cli.main([f"--workdir={tmp_path}", *ARGS])
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint"):
        cli.main([f"--workdir={tmp_path}", *ARGS])
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_model_checkpoint_mismatch(workdir, monkeypatch):
    run, data = workdir

    def other_model(identity, seed):
        options = {**identity["options"], "width": 6}
        return create_model("tiny", num_classes=10, rngs=nnx.Rngs(0), **options)

    monkeypatch.setattr(cli, "build_model", other_model)
    with pytest.raises(CheckpointError, match="does not match"):
        cli.restore_model(str(run))


def test_unknown_ood_set(workdir):
    run, data = workdir
    with pytest.raises(ValueError, match="Synthetic sets: gaussian"):
        cli.main(
            [f"--workdir={run}", f"--data_dir={data}", "--ood_sets=nonexistent", "--out_dir=x"]
        )
