"""The regime study's report (experiments.study.report.regime) on hand-written run folders."""

import json

import pytest

from experiments import cli
from experiments.study import regime
from experiments.study.plan import Run
from experiments.study.report import regime as report
from experiments.study.report.runs import REAL

EPOCHS, SEEDS = 2, 2
PILOT = f"pilot/ce_{regime.CHOSEN_RECIPE}_e{EPOCHS}"


def _per_set(value):
    return value if isinstance(value, tuple) else (value,) * len(REAL)


def _results(acc, ece, fpr=None, auroc=None):
    """The parts of a run's eval/results.json the report reads. ``fpr``, ``auroc``:
    {score: one value for every real set, or a tuple, one per set}; else 0.5 and 0.7."""
    metrics = {}
    for score in ("msp", "energy", "feature_norm"):
        f = _per_set((fpr or {}).get(score, 0.5))
        a = _per_set((auroc or {}).get(score, 0.7))
        metrics[score] = {
            s: {"fpr95": {"mean": f[i]}, "auroc": {"mean": a[i]}, "aupr_in": {"mean": 0.9}}
            for i, s in enumerate(REAL)
        }
    features = {"cifar10": {"feature_norm": {"q50": 5.0}}}
    features |= {s: {"feature_norm": {"q50": 3.0}} for s in REAL}
    return {
        "classification": {"accuracy": acc, "ece": ece},
        "ood": {"papers": {"metrics": metrics}},
        "data": {"id": {"name": "cifar10"}},
        "mmc": {"cifar10": 0.9},
        "config": {"optim": {"lr": 0.4}, "train": {"epochs": EPOCHS}, "objective": {}},
        "diagnostics": {
            "weights": {"cosine": {"mean": -0.11}, "optimal_cosine": -1 / 9, "num_classes": 10},
            "features": features,
        },
    }


def _record(epoch, train_acc, ece, msp, acc, norm=20.0, loss=0.05):
    return {
        "step": 10 * epoch,
        "epoch": float(epoch),
        "train_clean_accuracy": train_acc,
        "train_clean_loss": loss,
        "train_clean_logit_norm": norm,
        "test_accuracy": acc,
        "test_msp": msp,
        "test_ece": ece,
    }


def _write_run(root, name, results=None, records=(), log=()):
    run = root / name
    (run / "eval").mkdir(parents=True)
    if results is not None:
        (run / "eval" / "results.json").write_text(json.dumps(results))
    for file, lines in ((regime.REGIME_FILE, records), ("metrics.jsonl", log)):
        if lines:
            (run / file).write_text("".join(json.dumps(r) + "\n" for r in lines))


@pytest.fixture
def study_root(tmp_path):
    """Eight finished runs (no OE), one measured but not finished (l2norm seed 1)."""
    root = tmp_path / "regime"
    # CE: MSP FPR95 per real set (80, 84, 88) and (82, 86, 90): means 84 and 86. Energy
    # on textures 50 (seed 0) and 10 (seed 1).
    ce0 = _results(0.80, 0.12, {"msp": (0.80, 0.84, 0.88), "energy": (0.5, 0.5, 0.50)})
    ce1 = _results(0.82, 0.10, {"msp": (0.82, 0.86, 0.90), "energy": (0.5, 0.5, 0.10)})
    log = [{"step": 10, "epoch": 1.0, "logit_norm": 8.0, "train_accuracy": 0.6}]
    _write_run(
        root,
        PILOT,
        ce0,
        [_record(1, 0.70, 0.20, 0.80, 0.60, 10.0), _record(2, 0.99, 0.12, 0.92, 0.80, 20.0)],
        log,
    )
    _write_run(root, "ce/seed1", ce1, [_record(2, 0.96, 0.10, 0.91, 0.81, 18.0)])
    for seed, acc, fpr, ece in ((0, 0.79, 0.60, 0.05), (1, 0.80, 0.62, 0.07)):
        records = [_record(2, 0.99, 0.02, 0.80, 0.79, 4.0)] if seed == 0 else []
        results = _results(acc, ece, {"msp": fpr})
        _write_run(root, f"logitnorm/seed{seed}", results, records)
    _write_run(root, "logitnorm_tau0.01/seed0", _results(0.70, 0.115, {"msp": 0.50}))
    # Feature-norm AUROC: L2 90, same-architecture CE 89.5, plain CE 70.
    _write_run(root, "l2norm/seed0", _results(0.78, 0.03, auroc={"feature_norm": 0.90}))
    # Still training (logged to epoch 3), measured to epoch 2.
    partial_log = [{"step": 10 * e, "epoch": float(e), "logit_norm": 3.0} for e in (2, 3)]
    l2_records = [_record(2, 0.95, 0.02, 0.80, 0.79, 3.0)]
    _write_run(root, "l2norm/seed1", None, l2_records, partial_log)
    _write_run(root, "ce_l2arch/seed0", _results(0.79, 0.10, auroc={"feature_norm": 0.895}))
    _write_run(root, "energy_ft/seed0", _results(0.80, 0.05, {"energy": (0.2, 0.2, 0.30)}))
    return root


def _write(root, out):
    return report.write(str(root), str(out), regime.plan(EPOCHS, SEEDS, regime.CHOSEN_RECIPE))


def test_labels_name_every_planned_run():
    assert set(report.LABELS) == {*regime.RUNS, *regime.FINETUNED}
    runs = regime.plan(EPOCHS, SEEDS, regime.CHOSEN_RECIPE)
    assert report.name_of(runs[0]) == "ce" and runs[0].name == PILOT
    assert {report.name_of(r) for r in runs} == set(report.LABELS)


def test_the_regime_table_says_a_fine_tune_is_judged_by_a_rule_about_ce():
    runs = [
        Run("ce/seed0", "ce", 0),
        Run("energy_ft/seed0", "energy_ft", 0, init_from="ce/seed0"),
    ]
    curves = {
        "ce/seed0": {"regime": [_record(2, 0.99, 0.12, 0.92, 0.80)], "log": []},
        # 96% clean train accuracy after the fine-tune: "no" by the rule, which is CE's.
        "energy_ft/seed0": {"regime": [_record(2, 0.96, 0.15, 0.94, 0.79)], "log": []},
    }
    rows = report.rule_rows(runs, curves)
    table = [line for line in report._regime_section(rows, {}, []) if line.startswith("| ")]
    cells = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[-1] for line in table}
    assert cells["ce/seed0"] == "**yes**"
    assert cells["energy_ft/seed0"] == "no (a fine-tune of ce/seed0: the rule is CE's)"


def test_rule_per_run_and_missing_runs(study_root, tmp_path):
    summary = _write(study_root, tmp_path / "out")
    rule = summary["regime"]
    # CE seed 0 ends at 99% clean train accuracy, ECE 12%, MSP 92 > accuracy 80: met.
    assert rule[PILOT]["meets_rule"] is True and rule[PILOT]["final"]["epoch"] == 2.0
    assert rule["ce/seed1"]["meets_rule"] is False  # 96% < 97%
    assert rule["logitnorm/seed0"]["meets_rule"] is False  # ECE 2%
    # Measured to epoch 2 of the 3 logged so far (no OOD report yet): no verdict.
    assert rule["l2norm/seed1"]["meets_rule"] is None
    assert rule["l2norm/seed1"]["trained_epochs"] == 3.0
    assert rule["oe/seed0"] == {
        "final": None,
        "trained_epochs": None,
        "meets_rule": None,
        "fine_tunes": PILOT,
    }
    assert summary["missing"] == [
        "oe/seed0",
        "logitnorm_tau0.01/seed1",
        "l2norm/seed1",
        "ce_l2arch/seed1",
        "energy_ft/seed1",
        "oe/seed1",
    ]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| {PILOT} | 2 | 99.0 | 12.0 | 92.0 / 80.0 | **yes** |" in md
    assert "| ce/seed1 | 2 | 96.0 | 10.0 | 91.0 / 81.0 | no |" in md
    assert (
        "| l2norm/seed1 | 2 of 3 | 95.0 | 2.0 | 80.0 / 79.0 | not yet measured to the end |" in md
    )
    assert "Not measured yet: logitnorm_tau0.01/seed0, l2norm/seed0, ce_l2arch/seed0," in md
    assert (tmp_path / "out" / "plots" / "regime_over_training.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rule"] == regime.RULE


def test_per_epoch_means_over_the_seeds_that_have_the_epoch(study_root, tmp_path):
    summary = _write(study_root, tmp_path / "out")
    ce = summary["per_epoch"]["ce"]
    # Epoch 1: CE seed 0 only; epoch 2: both, (0.99 + 0.96) / 2 = 0.975, std 0.015.
    acc = {c["epoch"]: c for c in ce["train_clean_accuracy"]}
    assert acc[1.0]["values"] == [0.70]
    assert acc[2.0]["mean"] == pytest.approx(0.975) and acc[2.0]["std"] == pytest.approx(0.015)
    # Test MSP minus test accuracy at epoch 2: (0.92 - 0.80 + 0.91 - 0.81) / 2 = 0.11.
    (gap,) = [c for c in ce["confidence_gap"] if c["epoch"] == 2.0]
    assert gap["mean"] == pytest.approx(0.11)
    assert ce["log/logit_norm"] == [
        {"epoch": 1.0, "mean": 8.0, "std": 0.0, "n": 1, "values": [8.0]}
    ]
    # The unfinished L2 seed's measurements count; tau 0.01 has none and no log.
    assert summary["per_epoch"]["l2norm"]["train_clean_logit_norm"][0]["mean"] == 3.0
    assert "logitnorm_tau0.01" not in summary["per_epoch"]
    md = (tmp_path / "out" / "report.md").read_text()
    header = "| epoch | CE | LogitNorm (tau 0.04) | L2 feature norm |"
    assert header in md
    assert "| 2 | 97.5 ± 1.5 | 99.0 | 95.0 |" in md  # clean train accuracy
    assert "| 2 | 19.00 ± 1.00 | 4.00 | 3.00 |" in md  # logit norms (20, 18), 4, 3
    assert "| 1 | 70.0 | – | – |" in md


def test_main_table_cells(study_root, tmp_path):
    summary = _write(study_root, tmp_path / "out")
    rows = summary["rows"]
    assert list(rows) == [
        "ce",
        "logitnorm",
        "logitnorm_tau0.01",
        "l2norm",
        "ce_l2arch",
        "energy_ft",
    ]
    ce = rows["ce"]
    assert ce["seeds"] == [0, 1] and ce["score"] == "msp"
    # Energy FPR95 per seed: 50 and (50 + 50 + 10) / 3 = 36.7; mean 43.3, std 6.7.
    assert ce["energy/fpr95"]["values"] == pytest.approx([0.5, 1.1 / 3])
    # Per seed the mean over the real sets: 0.84 and 0.86.
    assert ce["msp/fpr95"]["values"] == pytest.approx([0.84, 0.86])
    assert rows["l2norm"]["score"] == "feature_norm"
    assert rows["energy_ft"]["energy/fpr95"]["mean"] == pytest.approx(0.7 / 3)
    md = (tmp_path / "out" / "report.md").read_text()
    # run, seeds, accuracy, ECE, then MSP / energy / ‖z‖ / own FPR95 and AUROC.
    assert (
        "| CE (msp) | 2 | 81.0 ± 1.0 | 11.0 ± 1.0 | 85.0 ± 1.0 | 70.0 ± 0.0 | "
        "43.3 ± 6.7 | 70.0 ± 0.0 | 50.0 ± 0.0 | 70.0 ± 0.0 | 85.0 ± 1.0 | 70.0 ± 0.0 |"
    ) in md
    assert "| L2 feature norm (feature_norm) | 1 | 78.0 | 3.0 | 50.0 | 70.0 | 50.0 | 70.0 |" in md
    # (20 + 20 + 30) / 3 = 23.3 energy FPR95; fine-tuned on Tiny ImageNet: marked.
    assert "| Energy FT (energy) † | 1 | 80.0 | 5.0 | 50.0 | 70.0 | 23.3 | 70.0 |" in md


def test_claims_and_verdicts(study_root, tmp_path):
    found = _write(study_root, tmp_path / "out")["claims"]
    by_claim = {c["claim"]: c for c in found}
    ln = by_claim["LogitNorm (tau 0.04) lowers MSP's FPR95 at about CE's accuracy"]
    # 61 ± 1 vs 85 ± 1: 24 points > 2 (the spread) and > 1; accuracy 79.5 vs 81.0.
    assert ln["verdict"] == "holds"
    assert "LogitNorm (tau 0.04) 61.0 ± 1.0 vs CE 85.0 ± 1.0 (-24.0 points)" in ln["evidence"]
    assert "accuracy 79.5 ± 0.5 vs 81.0 ± 1.0 (gap 1.5)" in ln["evidence"]
    # tau 0.01: 70% accuracy against CE's 81%, more than 2 points apart.
    low = by_claim["LogitNorm (tau 0.01) lowers MSP's FPR95 at about CE's accuracy"]
    assert low["verdict"] == "not comparable"
    assert "seed 0 70.0% / 50.0" in low["evidence"]
    # ECE: 6 ± 1 vs 11 ± 1 (5 > 2); 11.5 vs 11 +0.5 (does not hold).
    ece = by_claim["LogitNorm (tau 0.04) lowers CE's test ECE"]
    assert ece["verdict"] == "holds"
    assert "LogitNorm (tau 0.04) 6.0 ± 1.0 vs CE 11.0 ± 1.0 (-5.0 points)" in ece["evidence"]
    assert by_claim["LogitNorm (tau 0.01) lowers CE's test ECE"]["verdict"] == "does not hold"
    # L2 against the same-architecture CE (89.5), not plain CE (70): 0.5 points.
    (l2,) = [c for c in found if c["paper"].startswith("L2")]
    assert l2["verdict"] == "does not hold"
    assert "L2 90.0 vs same-architecture CE 89.5" in l2["evidence"]
    # Energy FT seed 0 on textures, 30, against its own CE start's energy (seed 0: 50,
    # not the mean with seed 1's 10).
    energy = by_claim["Energy FT beats the energy score of the CE model it starts from"]
    assert energy["verdict"] == "holds"
    assert "30.0 vs the CE start's energy 50.0" in energy["evidence"]
    oe = by_claim["Outlier exposure (FT) beats the msp score of the CE model it starts from"]
    assert oe["verdict"] == "not measured" and oe["evidence"].endswith("(not finished: oe)")
    pearce = [c for c in found if c["paper"].startswith("Pearce")]
    assert [c["verdict"] for c in pearce] == ["holds", "holds"]
    # 6 finished run names, 8 runs, 3 real sets each: 24 (run, set) pairs.
    assert "in 24 of 24 (run, set) pairs" in pearce[1]["evidence"]


def test_report_of_no_finished_run_says_not_measured(tmp_path):
    root = tmp_path / "empty"
    _write_run(root, PILOT, None, log=[{"epoch": 1.0, "logit_norm": 8.0, "train_accuracy": 0.5}])
    summary = _write(root, tmp_path / "out")
    assert summary["runs"] == [] and summary["rows"] == {}
    assert {c["verdict"] for c in summary["claims"]} == {"not measured"}
    assert summary["plots"] == ["plots/regime_over_training.png"]  # the training log
    md = (tmp_path / "out" / "report.md").read_text()
    assert "None measured yet." in md and "No from-scratch run has been measured yet" in md


def test_report_command(study_root, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["report", f"--workdir={study_root}", f"--report_dir={out}", f"--epochs={EPOCHS}"]
    regime.main([*argv, f"--seeds={SEEDS}"])
    assert "8 of 14 runs reported" in capsys.readouterr().out
    written = json.loads((out / "report.json").read_text())
    assert "--recipe subset10k" in written["command"]  # the chosen recipe by default
    assert written["rows"]["ce"]["seeds"] == [0, 1]
    with pytest.raises(cli.UsageError, match="--report_dir"):
        regime.main(["report", f"--workdir={study_root}"])


def test_read_regime_skips_a_torn_last_line(tmp_path):
    lines = [json.dumps(_record(1, 0.5, 0.1, 0.6, 0.5)), json.dumps(_record(2, 0.6, 0.1, 0.6, 0.5))]
    (tmp_path / regime.REGIME_FILE).write_text("\n".join(lines) + '\n{"step": 30, "ep')
    with pytest.warns(UserWarning, match="torn last line"):
        records = regime.read_regime(str(tmp_path))
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    assert regime.read_regime(str(tmp_path / "absent")) == []
