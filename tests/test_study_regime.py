"""The regime study's plan, rule and per-checkpoint measurements (experiments.study.regime)."""

import math

import numpy as np
import pytest

from experiments import cli
from experiments.study import regime


def test_softmax_stats_by_hand():
    # Two examples, two classes: logits (0, ln 3) -> p = (1/4, 3/4); (ln 2, 0) -> (2/3, 1/3).
    logits = np.array([[0.0, math.log(3.0)], [math.log(2.0), 0.0]], np.float32)
    labels = np.array([1, 1])
    stats = regime.softmax_stats(logits, labels)
    assert stats["accuracy"] == 0.5
    assert stats["loss"] == pytest.approx(-(math.log(3 / 4) + math.log(1 / 3)) / 2, rel=1e-6)
    assert stats["msp"] == pytest.approx((3 / 4 + 2 / 3) / 2, rel=1e-6)
    assert stats["logit_norm"] == pytest.approx((math.log(3.0) + math.log(2.0)) / 2, rel=1e-6)


def _record(train_acc, ece, msp, acc):
    return {
        "train_clean_accuracy": train_acc,
        "test_ece": ece,
        "test_msp": msp,
        "test_accuracy": acc,
    }


def test_the_rule_needs_fit_training_data_and_overconfidence():
    assert regime.meets_rule(_record(0.98, 0.05, 0.90, 0.85))
    assert not regime.meets_rule(_record(0.96, 0.05, 0.90, 0.85))  # not fitted
    assert not regime.meets_rule(_record(0.98, 0.03, 0.88, 0.85))  # calibrated enough
    # A large gap the other way (underconfidence) is not the regime.
    assert not regime.meets_rule(_record(0.98, 0.10, 0.75, 0.85))


def test_plan_runs_every_comparison_with_one_schedule_and_the_pilot_as_ce_seed0():
    runs = regime.plan(regime.PILOT_EPOCHS, seeds=2)
    per_seed = len(regime.RUNS) + len(regime.FINETUNED)
    assert len(runs) == 2 * per_seed
    assert runs[0] == regime.pilot_run()
    assert {r.seed for r in runs[:per_seed]} == {0}
    # Each seed's fine-tuning starts from that seed's CE run (seed 0's is the pilot).
    tuned = {r.name: r.init_from for r in runs if r.init_from}
    assert tuned == {
        "energy_ft/seed0": "pilot/ce_e30",
        "oe/seed0": "pilot/ce_e30",
        "energy_ft/seed1": "ce/seed1",
        "oe/seed1": "ce/seed1",
    }
    assert all(
        f"--config.train.epochs={regime.PILOT_EPOCHS}" in r.args for r in runs if not r.init_from
    )
    l2arch = [r for r in runs if r.name.startswith("ce_l2arch/")]
    assert all(r.method == "ce" for r in l2arch)
    assert "--config.model.options.spectral_norm=true" in l2arch[0].args
    # A longer schedule's CE seed 0 is that schedule's pilot, not the 30-epoch one.
    other = regime.plan(60, seeds=1)
    assert other[0] == regime.pilot_run(60) and other[0].name == "pilot/ce_e60"
    assert all("--config.train.epochs=60" in r.args for r in other if not r.init_from)


def test_command_keeps_one_checkpoint_per_epoch():
    run = regime.plan(12, seeds=1)[1]
    argv = regime.command(run, "/r")
    assert argv[2] == "experiments.cifar10_logitnorm"
    assert "--workdir=/r/logitnorm/seed0" in argv
    assert "--config.train.checkpoint_every=0" in argv
    assert "--config.train.max_to_keep=14" in argv


def test_recipes_change_one_thing_and_checkpoint_every_measured_epochs():
    pilot = regime.pilot_run(80, "subset10k")
    assert pilot.name == "pilot/ce_subset10k_e80"
    assert "--config.data.train_limit=10000" in pilot.args
    # 10,000 images at batch 256: 39 steps an epoch, a checkpoint every 4 epochs.
    argv = regime.command(pilot, "/r", measure_every=4)
    assert "--config.train.checkpoint_every=156" in argv
    assert "--config.train.max_to_keep=22" in argv
    # Full data, no augmentation: the main runs all carry the recipe.
    runs = regime.plan(15, seeds=1, recipe="noaug")
    assert runs[0] == regime.pilot_run(15, "noaug")
    assert all("--config.data.augment=false" in r.args for r in runs)
    tune = regime.command(runs[-1], "/r", 4)
    assert "--init_from=/r/pilot/ce_noaug_e15" in tune and tune[2] == "experiments.cifar10_oe"
    assert not any(a.startswith("--config.train.epochs") for a in tune)  # the preset's
    assert "--config.train.checkpoint_every=780" in regime.command(runs[1], "/r", 4)
    with pytest.raises(cli.UsageError, match="--recipe must be one of"):
        regime.pilot_run(10, "bigger")


def test_published_names_put_every_run_under_regime_and_the_pilot_as_ce_seed0():
    results = {"config": {"data": {"dataset": "cifar10", "source": "local"}}}
    results["model"] = {"name": "resnet9"}
    names = [regime.published_name(run, results) for run in regime.plan(80, 2, "subset10k")]
    assert len(set(names)) == len(names) == 14
    assert names[0] == "cifar10_jpeg/resnet9/regime/ce/seed0"  # the pilot
    assert "cifar10_jpeg/resnet9/regime/ce/seed1" in names
    assert "cifar10_jpeg/resnet9/regime/logitnorm_tau0.01/seed1" in names
    assert all(n.startswith("cifar10_jpeg/resnet9/regime/") for n in names)


def test_publish_needs_a_report_dir(tmp_path):
    with pytest.raises(cli.UsageError, match="publish needs --report_dir"):
        regime.main(["publish", "--workdir", str(tmp_path)])
    with pytest.raises(cli.UsageError, match="is not a folder"):
        regime.main(["publish", "--workdir", str(tmp_path / "no"), "--report_dir", str(tmp_path)])
    # The names carry no schedule, so another one would overwrite the chosen one's.
    with pytest.raises(cli.UsageError, match="only the chosen schedule"):
        regime.main(["publish", "--workdir", str(tmp_path), "--report_dir", "r", "--epochs", "5"])


def test_collect_copies_finished_measured_runs_without_checkpoints(tmp_path):
    import json
    import os

    root, dest = tmp_path / "study", tmp_path / "report" / "runs"
    runs = regime.plan(2, 1, "subset10k")
    results = {"ood": {"papers": {"metrics": {"msp": [1.5, 2.25]}}}, "config": {"seed": 0}}
    for run, measured in ((runs[0], True), (runs[1], True), (runs[2], False)):
        src = root / run.name
        (src / "eval").mkdir(parents=True)
        (src / "checkpoints" / "78").mkdir(parents=True)
        (src / "eval" / "results.json").write_text(json.dumps(results, indent=1))
        (src / "eval" / "scores.npz").write_bytes(b"big")
        for name in ("config.json", "metrics.jsonl", "final.json", "eval/results.md"):
            (src / name).write_text(f"{run.name} {name}")
        if measured:
            (src / regime.REGIME_FILE).write_text('{"step": 78}\n')
    (root / runs[3].name / "checkpoints").mkdir(parents=True)  # still training
    assert regime.collect(str(root), str(dest), runs) == [runs[0].name, runs[1].name]
    copied = dest / runs[0].name
    assert sorted(p.relative_to(copied).as_posix() for p in copied.rglob("*") if p.is_file()) == [
        "config.json",
        "eval/results.json",
        "eval/results.md",
        "final.json",
        "metrics.jsonl",
        "regime.jsonl",
    ]
    text = (copied / "eval" / "results.json").read_text()
    assert json.loads(text) == results and "\n" not in text and ", " not in text
    assert (copied / "final.json").read_text() == f"{runs[0].name} final.json"
    # Copied already: left alone, until the run's report is rewritten.
    assert regime.collect(str(root), str(dest), runs) == []
    report = root / runs[1].name / "eval" / "results.json"
    later = os.path.getmtime(dest / runs[1].name / "eval" / "results.json") + 5
    os.utime(report, (later, later))
    assert regime.collect(str(root), str(dest), runs) == [runs[1].name]
    with pytest.raises(cli.UsageError, match="collect needs --report_dir"):
        regime.main(["collect", "--workdir", str(root)])


def test_measure_reads_every_epoch_end_checkpoint_and_passes_over_a_mid_epoch_save(
    tmp_path, capsys
):
    import json
    import shutil

    from toy_models import write_cifar_split

    from experiments.configs import default as presets
    from experiments.train import train_and_evaluate

    write_cifar_split(tmp_path, "train", 64, seed=0)
    write_cifar_split(tmp_path, "test", 40, seed=1)
    config = presets.get_config("smoke", "ce")
    config.data.source = str(tmp_path)
    config.data.train_limit = config.data.test_limit = 0
    config.data.eval_batch_size = 40
    config.train.batch_size = 16  # 4 steps an epoch, a checkpoint at each epoch's end
    config.train.epochs = 2
    config.train.progress = False
    config.eval.ood = False
    run = tmp_path / "run"
    train_and_evaluate(config, run)
    # What Ctrl-C or SIGTERM at step 6 would have left: a checkpoint between epochs.
    shutil.copytree(run / "checkpoints" / "8", run / "checkpoints" / "6")

    records = regime.measure(str(run))
    assert [(r["step"], r["epoch"]) for r in records] == [(4, 1.0), (8, 2.0)]
    assert "step 6: mid-epoch" in capsys.readouterr().out
    # The measured test accuracy is the one the training log recorded at each epoch's end.
    with open(run / "metrics.jsonl") as f:
        logged = {r["step"]: r["test_accuracy"] for r in map(json.loads, f) if "test_accuracy" in r}
    assert {r["step"]: r["test_accuracy"] for r in records} == pytest.approx(logged, abs=1e-6)
    assert len(regime.read_regime(str(run))) == 2
