"""The experiment runner: presets, overrides, user errors, datasets, outliers, extensions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import cli
from experiments.configs import default as presets
from experiments.run_config import model_identity
from experiments.train import SCHEMA_FIELDS, complete_config, train_and_evaluate
from experiments.train import main as train_main
from ood_jax.checkpoint import CheckpointError
from ood_jax.train.logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_CODE = os.path.join(ROOT, "tests", "user_code")


def write_easy_cifar(folder, *, name="cifar10", num_classes=10, seed=0, sizes=(1200, 600)):
    """<name>_{train,test}.npz (decoded format) whose class is the image's mean colour."""
    rng = np.random.default_rng(seed)
    palette = rng.integers(30, 226, size=(num_classes, 3))
    for split, n in zip(("train", "test"), sizes, strict=True):
        labels = rng.integers(0, num_classes, n).astype(np.int32)
        noise = rng.integers(-25, 26, size=(n, 32, 32, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        np.savez(folder / f"{name}_{split}.npz", images=images, labels=labels)


def parse(overrides, preset="smoke", objective="logitnorm"):
    return cli.apply_overrides(
        presets.get_config(preset, objective),
        overrides,
        first=SCHEMA_FIELDS,
        prepare=complete_config,
    )


def test_paper_preset_records_the_papers_hyperparameters():
    c = parse([], preset="paper")
    assert (c.model.name, c.model.options.dropout_rate) == ("wrn40_2", 0.3)
    assert (c.train.epochs, c.train.batch_size) == (200, 128)
    assert (c.optim.lr, c.optim.schedule, tuple(c.optim.boundaries_epochs)) == (
        0.1,
        "step",
        (80, 140),
    )
    assert (c.optim.decay_factor, c.optim.weight_decay) == (0.1, 5e-4)
    assert (c.optim.momentum, c.optim.nesterov) == (0.9, True)
    # tau comes from the objective's registration: the paper's 0.04.
    assert c.objective.hparams.to_dict() == {"temperature": 0.04}
    assert parse([], preset="paper", objective="ce").objective.hparams.to_dict() == {}
    assert parse(["--config.objective.name=energy"]).objective.hparams.to_dict() == {
        "weight": 0.1,
        "m_in": -23.0,
        "m_out": -5.0,
    }
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get_config("huge")


def test_paper_preset_evaluates_on_sets_its_data_source_can_provide():
    from experiments.run_config import ood_set_names
    from ood_jax import data as D

    # From tfds: only sets tfds downloads by itself (no offline files, no manual step).
    names = ood_set_names(parse([], preset="paper"))
    assert names == ["svhn", "textures"]
    for name in names:
        spec = D.get_dataset_spec(name)
        assert spec.tfds_name and not spec.local_only and not spec.offline, name
    # From the offline files: the offline sets, never a download.
    offline = ood_set_names(parse(["--config.data.source=local"], preset="paper"))
    assert offline == ["tinyimagenet_crop", "tinyimagenet_resize", "textures_partial"]
    assert all(D.get_dataset_spec(n).offline for n in offline)
    # Named sets win.
    named = parse(["--config.eval.ood_sets=gaussian"], preset="paper")
    assert ood_set_names(named) == ["gaussian"]


def test_cifar100_takes_its_own_objective_values():
    # The dataset spec's values (Liu et al.'s -27/-5; LogitNorm authors' tau for CIFAR-100).
    c = parse(["--config.data.dataset=cifar100", "--config.objective.name=energy"])
    assert (c.objective.hparams.m_in, c.objective.hparams.m_out) == (-27.0, -5.0)
    c = parse(["--config.data.dataset=cifar100"])
    assert c.objective.hparams.temperature == 0.0085
    # ... and the user's override still wins.
    c = parse(["--config.data.dataset=cifar100", "--config.objective.hparams.temperature=0.02"])
    assert c.objective.hparams.temperature == 0.02


def test_overrides_parse_types_lists_and_open_model_options():
    c = parse(
        [
            "--config.optim.lr=1",
            "--config.train.progress=false",
            "--config.optim.boundaries_epochs=(40, 50)",
            "--config.model.name=resnet18",
            "--config.model.options.width=16",
            "--config.model.options.spectral_norm=true",
            "--config.objective.hparams.temperature=0.01",
            "--config.eval.ood_sets=gaussian,uniform",
            "--config.eval.scores=('msp', 'energy')",
            "--config.eval.score_hparams.knn.k=7",
            "--config.eval.score_hparams.odin.max_examples=16",
        ]
    )
    assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
    assert c.train.progress is False
    assert tuple(c.optim.boundaries_epochs) == (40, 50)
    assert c.model.name == "resnet18"
    assert c.model.options.width == 16 and c.model.options.spectral_norm is True
    assert c.objective.hparams.temperature == 0.01
    assert tuple(c.eval.ood_sets) == ("gaussian", "uniform")
    assert tuple(c.eval.scores) == ("msp", "energy")
    assert c.eval.score_hparams.knn.k == 7 and c.eval.score_hparams.odin.max_examples == 16
    assert c.eval.score_hparams.odin.temperature == 1000.0  # the registered default


def test_a_swept_hyperparameter_takes_several_values_from_the_command_line():
    # The field holds one float until then; `--temperatures 1,10` of the evaluation
    # command becomes exactly these overrides.
    c = parse(
        [
            "--config.eval.score_hparams.msp.temperature=1,1000",
            "--config.eval.score_hparams.energy.temperature=(1, 10)",
            "--config.eval.score_hparams.odin.temperature=10",
        ]
    )
    assert c.eval.score_hparams.msp.temperature == (1.0, 1000.0)
    assert c.eval.score_hparams.energy.temperature == (1.0, 10.0)
    assert c.eval.score_hparams.odin.temperature == 10.0
    with pytest.raises(cli.UsageError, match="could not convert"):
        parse(["--config.eval.score_hparams.msp.temperature=a,b"])
    with pytest.raises(cli.UsageError, match="knn.k"):  # k is not knn's swept value
        parse(["--config.eval.score_hparams.knn.k=3,5"])


def test_config_errors_name_the_field_before_any_work():
    import ml_collections

    from experiments.run_config import resolve

    config = presets.get_config("smoke")
    config.objective.hparams = ml_collections.ConfigDict({"temprature": 0.1})
    with pytest.raises(cli.UsageError, match=r"^config.objective.hparams: objective 'logitnorm' "):
        complete_config(config)
    config = presets.get_config("smoke")
    config.eval.score_hparams = ml_collections.ConfigDict({"bogus": {"k": 1}})
    with pytest.raises(cli.UsageError, match="^config.eval.score_hparams: unknown score 'bogus'"):
        complete_config(config)
    # The default suite is resolved (and found missing) before training, not after it.
    config = parse(["--config.data.dataset=svhn", "--config.eval.ood=true"])
    config.eval.ood_sets = ()
    with pytest.raises(cli.UsageError, match="'svhn' has no default OOD suite"):
        resolve(config)
    config = parse(["--config.eval.ood=true", "--config.eval.ood_sets=gaussian,svhm"])
    with pytest.raises(cli.UsageError, match="^config.eval.ood_sets: unknown OOD set 'svhm'"):
        resolve(config)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config.optim.lrr=0.1"], "unknown config field"),
        (["--config.optim.lr=fast"], "could not convert string to float"),
        (["--lr=0.1"], "unrecognized argument"),
        (["--config.objective.name=focal"], "unknown objective 'focal'"),
        (["--config.objective.hparams.temprature=0.1"], 'Did you mean "temperature"'),
        (["--config.data.dataset=mnist2"], "unknown dataset 'mnist2'"),
        (["--config.eval.scores=msp,bogus", "--config.eval.ood=true"], "unknown score 'bogus'"),
        (["--config.eval.score_hparams.bogus.k=1"], "unknown config field"),
        (["--config.train.batch_size=0"], "batch_size must be >= 1"),
        (["--config.data.train_limit=-5"], "train_limit must be >= 0"),
        (["--config.data.dataset=cifar100", "--data=local"], "no offline files"),
        (["--data=/nonexistent/folder"], "no such folder"),
        ([], "found neither cifar10_train.npz nor a train/<class>/ image folder"),
        (
            ["--config.eval.ood=true", "--config.eval.ood_sets=gaussian,svhm"],
            "unknown OOD set 'svhm'",
        ),
        (["--config.imports=no_such_module_xyz"], "cannot import 'no_such_module_xyz'"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    argv = [f"--workdir={tmp_path / 'run'}", "--preset=smoke", *args]
    if not any(a.startswith("--data=") for a in args):
        argv.append(f"--data={tmp_path}")  # empty folder: loading would fail later
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()  # nothing written for a rejected run


def test_data_file_instead_of_folder_is_a_clear_error(tmp_path, capsys):
    write_easy_cifar(tmp_path, sizes=(80, 40))
    argv = [
        f"--workdir={tmp_path / 'run'}",
        "--preset=smoke",
        f"--data={tmp_path}/cifar10_train.npz",
    ]
    with pytest.raises(SystemExit):
        train_main(argv)
    assert "that is a file, not a folder" in capsys.readouterr().err


def test_cli_user_error_has_no_traceback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.cifar10_ce",
            f"--workdir={tmp_path}",
            "--preset=smoke",
            "--config.eval.ood_sets=gaussian,uniform",
            "--config.optim.lr=abc",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "config.optim.lr" in done.stderr


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


def _smoke(tmp_path, data, *overrides, dataset="cifar10"):
    c = parse(
        [
            f"--config.data.dataset={dataset}",
            f"--config.data.source={data}",
            "--config.data.train_limit=256",
            "--config.data.test_limit=64",
            "--config.train.batch_size=32",
            "--config.train.epochs=1",
            "--config.train.progress=false",
            *overrides,
        ]
    )
    return c, train_and_evaluate(c, tmp_path / "run")


@pytest.mark.slow
def test_cifar100_from_local_files(tmp_path):
    write_easy_cifar(tmp_path, name="cifar100", num_classes=100, sizes=(400, 100))
    c, final = _smoke(tmp_path, tmp_path, dataset="cifar100")
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["data"]["dataset"] == "cifar100" and meta["objective"]["hparams"] == {
        "temperature": 0.0085
    }
    from experiments.evaluate import restore_model

    model, metadata, _ = restore_model(str(tmp_path / "run"))
    assert metadata["model"]["num_classes"] == 100 and model.head.kernel.shape[-1] == 100
    assert final["test_examples"] == 64


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective, term", [("energy", "energy_term"), ("outlier_exposure", "outlier_term")]
)
def test_outlier_objectives_run_from_the_config(tmp_path, objective, term):
    write_easy_cifar(tmp_path, sizes=(300, 64))
    outliers = tmp_path / "outliers.npz"
    noise = np.random.default_rng(1).integers(0, 256, (200, 32, 32, 3)).astype(np.uint8)
    np.savez(outliers, images=noise, labels=np.full(200, -1, np.int32))
    c, final = _smoke(
        tmp_path,
        tmp_path,
        f"--config.objective.name={objective}",
        f"--config.data.outliers.source={outliers}",
        "--config.data.outliers.ratio=2",
    )
    records = read_metrics(tmp_path / "run")
    assert np.isfinite(records[-1][f"train_{term}"])
    assert final["step"] == 256 // 32
    # The checkpoint records the outlier stream's position (64 outliers per step).
    from ood_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    aux = ckpt.read_metadata()["aux_data"]
    ckpt.close()
    assert aux["step"] == final["step"] and aux["batch_size"] == 64


@pytest.mark.slow
def test_user_objective_score_and_dataset_from_outside_the_package(tmp_path):
    """The three extension points of docs/architecture.md, each one file, via the CLI."""
    write_easy_cifar(tmp_path, sizes=(256, 64))
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, USER_CODE])}
    args = [
        sys.executable,
        "-m",
        "experiments.train",
        f"--workdir={workdir}",
        "--preset=smoke",
        f"--data={tmp_path}",
        "--config.imports=my_extensions",
        "--config.objective.name=scaled_ce",
        "--config.objective.hparams.scale=0.5",
        "--config.train.batch_size=32",
        "--config.train.progress=false",
        "--config.eval.ood=true",
        "--config.eval.ood_sets=stripes,gaussian",
        "--config.eval.num_synthetic=40",
        "--config.eval.scores=feature_norm,neg_feature_norm",
        "--config.eval.protocols=full",
    ]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["objective"] == {"name": "scaled_ce", "hparams": {"scale": 0.5}, "auto": []}
    assert read_metrics(workdir)[-1]["train_scale"] == 0.5  # the objective's own metric
    results = json.loads((workdir / "eval" / "results.json").read_text())
    assert results["data"]["ood"]["stripes"]["num_examples"] == 48
    metrics = results["ood"]["full"]["metrics"]
    for name in ("stripes", "gaussian"):
        # -||z|| ranks every (ID, OOD) pair the other way round (no ties in float32 norms).
        plain = metrics["feature_norm"][name]["auroc"]["mean"]
        assert metrics["neg_feature_norm"][name]["auroc"]["mean"] == pytest.approx(1 - plain)
    assert "-FeatureNorm" in (workdir / "eval" / "results.md").read_text()


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
    assert config["objective"] == {
        "name": "logitnorm",
        "hparams": {"temperature": 0.04},
        "auto": [],
    }
    assert os.listdir(workdir / "checkpoints")

    # The same workdir with another model configuration: a clear error, no retraining,
    # and config.json still describes the model that was trained.
    saved_config = (workdir / "config.json").read_text()
    other = parse([f"--config.data.source={data}", "--config.model.options.width=16"])
    other.train.progress = False
    with pytest.raises(CheckpointError, match="of another model"):
        train_and_evaluate(other, workdir)
    assert (workdir / "config.json").read_text() == saved_config


@pytest.mark.slow
def test_resume_rejects_changed_settings_and_repairs_a_torn_log(tmp_path, capsys):
    write_easy_cifar(tmp_path, sizes=(256, 64))
    run = tmp_path / "run"
    base = [f"--workdir={run}", "--preset=smoke", f"--data={tmp_path}"]
    base += ["--config.train.batch_size=32", "--config.train.progress=false"]
    train_main([*base, "--config.train.epochs=1"])
    saved_config = (run / "config.json").read_text()
    # A changed learning rate on resume: one line naming the field, nothing written.
    with pytest.raises(SystemExit) as exit_info:
        train_main([*base, "--config.train.epochs=1", "--config.optim.lr=0.5"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.05 -> 0.5" in err and "allow_changes" in err
    assert (run / "config.json").read_text() == saved_config
    # A torn last line (a crash mid-write) is skipped with a warning and repaired.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 16, "epo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:2: torn last line"):
        records = read_metrics(run)
    assert [r["step"] for r in records] == [8]
    # Opting in: two more epochs, the change recorded with the step it took effect.
    with pytest.warns(UserWarning, match="torn last line"):
        final = train_main([*base, "--config.train.epochs=2", "--config.train.allow_changes=true"])
    assert final["step"] == 16
    changes = [json.loads(line) for line in (run / "changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 8, "changes": {"train.epochs": [1, 2]}}]
    assert [r["step"] for r in read_metrics(run)] == [8, 16]  # the torn line is gone

    # A second run on the workdir while one holds it: refused at start, one line.
    import fcntl

    with open(run / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("12345")
        held.flush()
        with pytest.raises(SystemExit) as exit_info:
            train_main([*base, "--config.train.epochs=2"])
        assert exit_info.value.code == 2
        assert "another run (process" in capsys.readouterr().err
    # Released (as a crashed run's lock is, by the OS): the next run goes ahead.
    assert train_main([*base, "--config.train.epochs=2"])["step"] == 16


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_143_and_a_second_run_is_refused(tmp_path):
    import signal
    import time

    write_easy_cifar(tmp_path, sizes=(256, 64))
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "experiments.cifar10_ce",
        f"--workdir={run}",
        "--preset=smoke",
        f"--data={tmp_path}",
        "--config.train.batch_size=32",
        "--config.train.progress=false",
        "--config.train.epochs=400",  # far longer than the test waits
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)  # the first epoch is done: compiled and training
    # A second run on the workdir while that process trains: refused at once.
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip() == (
        f"error: another run (process {proc.pid}) is using {str(run)!r}; wait for it to "
        "finish or choose another --workdir."
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: SIGTERM at step ") and "run the same command" in last
    assert "Traceback" not in err
    step = int(last.split("at step ")[1].split(":")[0])
    from ood_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(str(run / "checkpoints"))
    assert ckpt.latest_step() == step
    ckpt.close()
    # The saved state resumes (here to two more steps).
    final = train_main(
        [
            *command[3:],
            f"--config.train.num_steps={step + 2}",
            "--config.train.allow_changes=true",
        ]
    )
    assert final["step"] == step + 2


FULL_DISK_RUN = """
import shutil, sys
from collections import namedtuple

usage, real, calls = namedtuple("usage", "total used free"), shutil.disk_usage, []

def disk_usage(path):  # the disk fills up after the first checkpoint
    calls.append(path)
    return real(path) if len(calls) == 1 else usage(10**9, 10**9 - 1000, 1000)

shutil.disk_usage = disk_usage
from experiments import cli, train
cli.run_main(lambda argv: train.main(argv, method="ce"), sys.argv[1:])
"""


@pytest.mark.slow
def test_full_disk_is_one_line_and_the_rerun_resumes(tmp_path):
    write_easy_cifar(tmp_path, sizes=(256, 64))
    run_dir = tmp_path / "run"
    args = [f"--workdir={run_dir}", "--preset=smoke", f"--data={tmp_path}"]
    args += ["--config.train.batch_size=32", "--config.train.progress=false"]
    args += ["--config.train.checkpoint_every=4", "--config.train.num_steps=12"]
    env = {**os.environ, "PYTHONPATH": ROOT}

    def run(*command):
        return subprocess.run(
            [sys.executable, *command, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = run("-c", FULL_DISK_RUN)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"error: no space left on device for checkpoint step 8 in {run_dir}/checkpoints (it "
        "needs "
        + done.stderr.split("(it needs ")[1].split(")")[0]
        + "); checkpoint step 4 is intact. Free some space and run the same command again."
    ]
    rerun = run("-m", "experiments.cifar10_ce")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resumed from checkpoint step 4" in rerun.stdout + rerun.stderr
