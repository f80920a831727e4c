"""Around a long run: TensorBoard events, a profile on request, the compilation cache.

The events are read back with TensorBoard's own reader and compared with what
``metrics.jsonl`` and ``results.json`` hold; the cache is tested in processes of
its own by the entries it writes (a start that compiles nothing new adds none).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_experiments import ROOT, parse, write_easy_cifar

from experiments import compile_cache
from experiments.train import train_and_evaluate
from ood_jax.evaluate import report_scalars
from ood_jax.train.logging import MetricsLog, read_metrics, record_scalars


def events(logdir) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the event files in ``logdir``, by TensorBoard's reader."""
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_record_scalars_name_every_curve_by_hand():
    record = {
        "step": 40,
        "epoch": 2.0,
        "time": 3.0,
        "train_loss": 1.5,
        "train_accuracy": 0.5,
        "logit_norm": 7.0,
        "lr": 0.1,
        "images_per_s": 400.0,
        "test_accuracy": 0.25,
        "train_energy_term": 2.0,
        "test_loss": None,
        "partial": True,
        "steps_averaged": 3,
    }
    assert record_scalars(record) == {
        "train/loss": 1.5,
        "train/accuracy": 0.5,
        "train/logit_norm": 7.0,
        "train/lr": 0.1,
        "perf/images_per_s": 400.0,
        "test/accuracy": 0.25,
        "train/energy_term": 2.0,
    }


def test_report_scalars_read_the_reports_means_by_hand():
    results = {
        "ood": {
            "papers": {
                "metrics": {
                    "msp": {
                        "gaussian": {"auroc": {"mean": 0.9, "std": 0.1}, "fpr95": {"mean": 0.2}},
                    }
                }
            }
        },
        "classification": {"accuracy": 0.75, "ece": 0.05, "num_bins": 15},
    }
    assert report_scalars(results) == {
        "ood_papers/msp/gaussian/auroc": 0.9,
        "ood_papers/msp/gaussian/fpr95": 0.2,
        "classification/accuracy": 0.75,
        "classification/ece": 0.05,
    }


def test_a_resumed_log_rewrites_its_events_with_each_step_once(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in (10, 20, 30):
        log.write({"step": step, "train_loss": float(step)})
    log.close()
    # A crash after step 30's record, the newest checkpoint at 20: the resume redoes 30.
    log = MetricsLog(tmp_path, resume_step=20, tensorboard=True)
    log.write({"step": 30, "train_loss": 31.0})
    log.write({"step": 40, "train_loss": 40.0})
    log.close()
    found = events(tmp_path / "tensorboard" / "train")
    assert found["train/loss"] == [(10, 10.0), (20, 20.0), (30, 31.0), (40, 40.0)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30, 40]


def _smoke(tmp_path, *extra):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_easy_cifar(data, sizes=(256, 128))
    return parse(
        [
            f"--config.data.source={data}",
            "--config.train.batch_size=32",
            "--config.train.progress=false",
            "--config.eval.ood=true",
            "--config.eval.ood_sets=gaussian",
            "--config.eval.scores=msp,energy",
            "--config.eval.adversarial_noise=0",
            "--config.eval.num_synthetic=64",
            "--config.eval.protocols=full",
            *extra,
        ],
        objective="ce",
    )


@pytest.mark.slow
def test_tensorboard_shows_the_curves_and_the_reports_numbers_and_a_resume_once(tmp_path):
    run = tmp_path / "run"
    train_and_evaluate(_smoke(tmp_path, "--config.train.epochs=1"), run)
    longer = ["--config.train.epochs=2", "--config.train.allow_changes=true"]
    summary = train_and_evaluate(_smoke(tmp_path, *longer), run)
    records = read_metrics(run)
    found = events(run / "tensorboard" / "train")
    steps = [r["step"] for r in records]
    assert steps == [8, 16]
    for key, tag in (("train_loss", "train/loss"), ("test_accuracy", "test/accuracy")):
        assert [s for s, _ in found[tag]] == steps  # each step once, resume included
        np.testing.assert_allclose([v for _, v in found[tag]], [r[key] for r in records], rtol=1e-6)
    results = json.loads((run / "eval" / "results.json").read_text())
    report = events(run / "tensorboard" / "eval")
    auroc = results["ood"]["full"]["metrics"]["energy"]["gaussian"]["auroc"]["mean"]
    assert report["ood_full/energy/gaussian/auroc"] == [(summary["step"], pytest.approx(auroc))]
    assert report["classification/accuracy"][0][1] == pytest.approx(
        results["classification"]["accuracy"]
    )


@pytest.mark.slow
def test_a_profile_of_n_steps_leaves_training_unchanged(tmp_path):
    base = ["--config.train.epochs=1", "--config.eval.ood=false"]
    plain = train_and_evaluate(
        _smoke(tmp_path, *base, "--config.train.tensorboard=false"), tmp_path / "a"
    )
    profiled = train_and_evaluate(
        _smoke(tmp_path, *base, "--config.train.profile_steps=3"), tmp_path / "b"
    )
    traces = list((tmp_path / "b" / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert (
        not (tmp_path / "a" / "profile").exists() and not (tmp_path / "a" / "tensorboard").exists()
    )
    assert profiled["test_accuracy"] == plain["test_accuracy"]
    losses = [[r["train_loss"] for r in read_metrics(tmp_path / w)] for w in ("a", "b")]
    assert losses[0] == losses[1]


def test_cache_folder_follows_config_then_environment_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == str(tmp_path / "xdg" / "ood_jax" / "jax")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.cache_dir() == str(tmp_path / "env")
    assert compile_cache.cache_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")
    assert compile_cache.cache_dir("off") is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.cache_dir() is None


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir()} if cache.exists() else set()


def _start(tmp_path, name: str, cache: Path, *extra: str, xla_flags: str = "") -> None:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_easy_cifar(data, sizes=(256, 128))
    env = {**os.environ, compile_cache.ENV: str(cache)}
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip()
    argv = [
        sys.executable,
        "-m",
        "experiments.cifar10_ce",
        f"--workdir={tmp_path / name}",
        "--preset=smoke",
        f"--data={data}",
        "--config.train.num_steps=2",
        "--config.train.progress=false",
        "--config.eval.ood=false",
        *extra,
    ]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_a_second_start_compiles_nothing_and_a_changed_program_or_flag_misses(tmp_path):
    cache = tmp_path / "cache"
    _start(tmp_path, "first", cache)
    cold = _entries(cache)
    assert cold, "the first start wrote no cache entry"
    _start(tmp_path, "again", cache)  # the same programs: every one a hit
    assert _entries(cache) == cold
    _start(tmp_path, "wider", cache, "--config.model.options.width=4")  # another program
    wider = _entries(cache)
    assert wider > cold
    _start(tmp_path, "flag", cache, xla_flags="--xla_cpu_enable_fast_math=true")  # another flag
    assert _entries(cache) > wider
    before = _entries(cache)
    _start(
        tmp_path,
        "off",
        cache,
        "--config.train.compilation_cache=off",
        "--config.model.options.width=6",
    )
    assert (tmp_path / "off" / "final.json").exists() and _entries(cache) == before
