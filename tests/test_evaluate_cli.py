"""``python -m experiments.evaluate`` on a workdir written by the training experiment."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import experiments.workdir
from experiments import evaluate as cli
from experiments.configs import default as presets
from experiments.train import train_and_evaluate
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
    # The end-of-training report, with the settings ARGS gives the CLI below.
    config.eval.ood = True
    config.eval.ood_sets = ("gaussian", "blobs")
    config.eval.num_synthetic = 24
    config.eval.max_ood = 20
    config.eval.scores = ("msp", "energy", "mahalanobis", "odin")
    config.eval.num_draws = 2
    config.eval.score_hparams = {"odin": {"max_examples": 16}}
    config.eval.adversarial_noise = 16
    config.eval.attack_steps = 2
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(config, workdir)
    return workdir, data


ARGS = [
    "--ood_sets=gaussian,blobs",
    "--num_synthetic=24",
    "--max_ood=20",
    "--config.eval.score_hparams.odin.max_examples=16",
    "--scores=msp,energy,mahalanobis,odin",
    "--num_draws=2",
]


def test_cli_writes_report_for_latest_checkpoint(workdir):
    run, data = workdir
    # The end-of-training report of the same checkpoint, through the same path.
    at_end = json.loads((run / "eval" / "results.json").read_text())
    results = cli.main([f"--workdir={run}", f"--data_dir={data}", *ARGS])
    report = run / "eval"
    on_disk = json.loads((report / "results.json").read_text())
    assert on_disk["complete"] and on_disk["checkpoint"]["step"] == 4
    assert on_disk["model"]["name"] == "tiny" and on_disk["config"]["preset"] == "smoke"
    assert on_disk["command"].startswith("python -m experiments.evaluate --workdir=")
    assert list(on_disk["ood"]) == ["papers", "full"]
    sets = {"gaussian", "blobs", "adversarial_noise"}
    assert set(on_disk["ood"]["full"]["metrics"]["odin"]) == sets | {"average"}
    assert on_disk["data"]["id"]["num_examples"] == 64
    gaussian = on_disk["data"]["ood"]["gaussian"]
    assert gaussian["num_examples"] == 20 and "random 20 of 24" in gaussian["source"]
    # ODIN on 16-image subsets of every set; its draws are recorded apart.
    assert on_disk["image_score_examples"] == {
        "odin": {"cifar10": 16, "gaussian": 16, "blobs": 16, "adversarial_noise": 16}
    }
    assert on_disk["ood"]["papers"]["extra_draws"]["odin"]["blobs"]["num_examples"] == 12
    # Identical numbers to the end-of-training report (same checkpoint, data, settings).
    for key in ("ood", "classification", "diagnostics", "score_hparams", "data", "mmc", "spec"):
        assert on_disk[key] == at_end[key], key
    assert "ODIN on seeded random subsets" in (report / "results.md").read_text()
    # The logit-norm curve comes from the training run's metrics.jsonl.
    assert on_disk["diagnostics"]["logit_norm_curve"]["logit_norm"]["step"] == [4.0]
    assert (report / "plots" / "logit_norm.png").exists()
    assert "Energy" in (report / "results.md").read_text()
    # The restored model reproduces the training run's final test accuracy.
    final = json.loads((run / "final.json").read_text())
    assert results["classification"]["accuracy"] == pytest.approx(final["test_accuracy"])


def test_the_spec_is_built_from_config_eval():
    from experiments.run_config import eval_spec

    config = presets.get_config("smoke", "logitnorm")
    config.eval.scores = ("msp", "", "knn")
    config.eval.max_ood = 0
    config.eval.score_hparams = {"knn": {"k": 7}}
    spec = eval_spec(config, batch_size=32)
    assert spec.scores == ("msp", "knn") and spec.score_hparams["knn"]["k"] == 7
    assert spec.max_ood is None and spec.max_train == config.eval.max_train == 512
    assert spec.seed == config.seed and spec.batch_size == 32
    assert (spec.adversarial_noise, spec.attack_steps) == (64, 5)
    assert spec.protocols == tuple(config.eval.protocols)


def user_error(capsys, argv):
    """Runs the CLI expecting a user error: exit status 2 and one stderr line."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_missing_step(workdir, capsys):
    run, data = workdir
    err = user_error(capsys, [f"--workdir={run}", f"--data_dir={data}", "--step=7", *ARGS])
    assert "no checkpoint for step 7" in err
    assert not (run / "eval_step7").exists()


def test_workdir_without_checkpoint(tmp_path, capsys):
    assert "no checkpoints/ folder" in user_error(capsys, [f"--workdir={tmp_path}", *ARGS])
    (tmp_path / "checkpoints").mkdir()
    assert "holds no checkpoint" in user_error(capsys, [f"--workdir={tmp_path}", *ARGS])
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


def test_corrupt_checkpoint_is_one_line_naming_the_step(workdir, tmp_path, capsys):
    import shutil

    run, data = workdir
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (step,) = [n for n in os.listdir(copy / "checkpoints") if n.isdigit()]
    files = [os.path.join(d, f) for d, _, fs in os.walk(copy / "checkpoints" / step) for f in fs]
    target = next(f for f in files if f"{os.sep}d{os.sep}" in f)
    with open(target, "r+b") as f:
        f.truncate(5)
    err = user_error(capsys, [f"--workdir={copy}", f"--data_dir={data}", *ARGS])
    assert f"checkpoint {step} in {copy}/checkpoints is corrupt" in err
    assert not (copy / "eval").exists() or sorted(os.listdir(copy / "eval")) == sorted(
        os.listdir(run / "eval")
    )


def test_model_checkpoint_mismatch(workdir, monkeypatch):
    run, data = workdir

    def other_model(identity, seed):
        options = {**identity["options"], "width": 6}
        return create_model("tiny", num_classes=10, rngs=nnx.Rngs(0), **options)

    monkeypatch.setattr(experiments.workdir, "build_model", other_model)
    with pytest.raises(CheckpointError, match="does not match"):
        cli.restore_model(str(run))


def test_unknown_ood_set(workdir, capsys):
    run, data = workdir
    argv = [f"--workdir={run}", f"--data_dir={data}", "--ood_sets=nonexistent", "--out_dir=x"]
    assert "synthetic sets: gaussian" in user_error(capsys, argv)


def test_an_older_runs_config_gets_todays_new_fields():
    # results/cpu_logitnorm was written before the adversarial-noise set and
    # objective.auto existed; its own values must survive, the new fields default.
    saved = json.loads(
        (Path(__file__).parents[1] / "results" / "cpu_logitnorm" / "results.json").read_text()
    )["config"]
    assert "adversarial_noise" not in saved["eval"]
    config = cli.saved_config(saved)
    assert config.eval.adversarial_noise == 1000 and tuple(config.objective.auto) == ()
    assert (
        config.optim.lr == saved["optim"]["lr"] and config.train.epochs == saved["train"]["epochs"]
    )
    assert tuple(config.eval.ood_sets) == tuple(saved["eval"]["ood_sets"])


def test_temperatures_sweep_msp_and_energy_from_the_command_line(workdir, tmp_path):
    run, data = workdir
    out = tmp_path / "sweep"
    args = [a for a in ARGS if not a.startswith("--scores")] + ["--scores=msp,energy"]
    results = cli.main(
        [f"--workdir={run}", f"--data_dir={data}", *args, "--temperatures=1,10", f"--out_dir={out}"]
    )
    metrics = results["ood"]["papers"]["metrics"]
    assert {"msp", "msp_T10", "energy", "energy_T10"} <= set(metrics)
    # T = 1 is the plain score: its numbers are the default report's.
    plain = json.loads((run / "eval" / "results.json").read_text())["ood"]["papers"]["metrics"]
    assert metrics["msp"]["gaussian"] == plain["msp"]["gaussian"]
