"""The reproduction study's command: runs, resumes, skips finished runs, writes the report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import methods, study
from experiments.study.report.runs import format_cell, mean_std, set_metric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_matches_the_issue():
    runs = study.plan()
    main = [r for r in runs if r.group == "main"]
    planned = {m: methods.get(m).study.seeds for m in methods.STUDY_ORDER}
    seeds = {m: sorted(r.seed for r in main if r.method == m) for m in planned}
    assert seeds == {m: list(range(n)) for m, n in planned.items()}
    assert all(n >= 3 for m, n in planned.items() if m in ("ce", "logitnorm", "l2norm"))
    # Every from-scratch method gets the same epochs; fine-tuning starts from CE's run.
    scratch = [r for r in main if r.init_from is None]
    assert {a for r in scratch for a in r.args if "epochs" in a} == {"--config.train.epochs=5"}
    assert all(r.init_from == f"ce/seed{r.seed}" for r in main if r.init_from)
    # Seed 0 of every method comes before any seed 1.
    order = [r.seed for r in main]
    assert order.index(1) > max(i for i, s in enumerate(order) if s == 0)
    assert len({r.name for r in runs}) == len(runs)


def test_noise_methods_train_at_the_authors_lr_with_a_ce_baseline_there():
    from experiments.methods import get_config

    # CEDA diverged at the cpu preset's lr 0.4; CEDA/ACET use the authors' 0.1.
    lrs = {m: get_config(m, "cpu").optim.lr for m in ("ce", "logitnorm", "l2norm", "ceda", "acet")}
    assert lrs == {"ce": 0.4, "logitnorm": 0.4, "l2norm": 0.4, "ceda": 0.1, "acet": 0.1}
    assert get_config("ceda", "paper").optim.lr == 0.1
    sweep = {r.name: r for r in study.plan() if r.group == "sweep"}
    assert "--config.optim.lr=0.1" in sweep["sweep/ce_lr0.1/seed0"].args
    assert "--config.optim.lr=0.4" in sweep["sweep/ceda_lr0.4/seed0"].args


def test_noise_claims_compare_with_ce_at_the_same_lr():
    from experiments.study.report.claims import _baseline_at_lr

    def entry(name, method, lr, epochs=5):
        run = study.Run(name, method, 0, group="sweep" if "sweep" in name else "main")
        cfg = {"optim": {"lr": lr}, "train": {"epochs": epochs}}
        return {"run": run, "results": {"config": cfg}}

    main = {"ce": [entry("ce/seed0", "ce", 0.4)], "ceda": [entry("ceda/seed0", "ceda", 0.1)]}
    name, base = _baseline_at_lr(main, {}, main["ceda"])
    assert base == main["ce"] and "no CE run at lr 0.1" in name
    other = {
        "sweep/ce_epochs2x/seed0": entry("sweep/ce_epochs2x/seed0", "ce", 0.4, 10),
        "sweep/ce_lr0.1/seed0": entry("sweep/ce_lr0.1/seed0", "ce", 0.1),
    }
    name, base = _baseline_at_lr(main, other, main["ceda"])
    assert [e["run"].name for e in base] == ["sweep/ce_lr0.1/seed0"]
    # Same lr as the main CE runs: those are the baseline.
    name, base = _baseline_at_lr(main, other, main["ce"])
    assert name == "CE" and base == main["ce"]


def test_group_averages_and_spread_by_hand():
    results = {
        "ood": {
            "papers": {
                "metrics": {
                    "msp": {
                        "a": {"auroc": {"mean": 0.9}},
                        "b": {"auroc": {"mean": 0.7}},
                    }
                }
            }
        }
    }
    assert set_metric(results, "msp", ["a", "b", "absent"], "auroc") == pytest.approx(0.8)
    assert np.isnan(set_metric(results, "msp", ["absent"], "auroc"))
    cell = mean_std([0.8, 0.6, float("nan")])
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(0.7)
    assert cell["std"] == pytest.approx(0.1)  # population std of (0.8, 0.6)
    # In %, one decimal: 70.0 ± 10.0; one value has no spread; none is a dash.
    assert format_cell(cell) == "70.0 ± 10.0"
    assert format_cell(mean_std([0.1234])) == "12.3"
    assert format_cell(mean_std([])) == "–"
    assert format_cell(mean_std([1.5, 2.5]), 1, 2) == "2.00 ± 0.50"


@pytest.mark.slow
def test_study_command_runs_resumes_and_reports(tmp_path):
    from test_experiments import write_easy_cifar

    write_easy_cifar(tmp_path, sizes=(256, 120))
    work = tmp_path / "study"
    argv = [sys.executable, "-m", "experiments.study", f"--workdir={work}"]
    argv += ["--preset=smoke", f"--data={tmp_path}", "--epochs=1"]
    argv += ["--only=ce/seed0,logitnorm/seed0,oe/seed0", f"--report_dir={work / 'report'}"]
    # Not every registered detector (40 s of compiling per run): the report's own and KNN.
    argv += ["--scores=knn"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("ce/seed0", "logitnorm/seed0", "oe/seed0"):
        assert (work / name / "eval" / "results.json").exists(), name
    report = json.loads((work / "report" / "results.json").read_text())
    assert report["runs"] == ["ce/seed0", "logitnorm/seed0", "oe/seed0"]
    assert "l2norm/seed0" in report["missing"] and report["complete"] is False
    md = (work / "report" / "results.md").read_text()
    assert "| Cross-entropy (msp) | 1 |" in md and "| LogitNorm (msp) | 1 |" in md
    assert "Outlier exposure (FT) (msp) †" in md
    ce = json.loads((work / "ce" / "seed0" / "eval" / "results.json").read_text())
    acc = ce["classification"]["accuracy"]
    expected_scores = {"msp", "max_logit", "energy", "feature_norm", "knn"}
    expected_scores |= {"mahalanobis", "mahalanobis_l2", "gmm", "gmm_l2"}
    assert set(ce["ood"]["papers"]["metrics"]) == expected_scores
    assert report["rows"]["ce"]["accuracy"]["mean"] == pytest.approx(acc)
    # The report's synthetic average is the mean of the run's per-set means.
    per_set = ce["ood"]["papers"]["metrics"]["msp"]
    expected = np.mean([per_set[s]["auroc"]["mean"] for s in ("gaussian", "uniform")])
    assert report["rows"]["ce"]["synthetic/auroc"]["mean"] == pytest.approx(expected)
    assert any(c["paper"].startswith("LogitNorm") for c in report["claims"])
    # The OpenOOD-convention table uses the same draws: AUROC agrees with the main one.
    openood = report["openood_convention"]["ce"]["synthetic/auroc"]["mean"]
    assert openood == pytest.approx(report["rows"]["ce"]["synthetic/auroc"]["mean"], abs=1e-6)
    assert "plots/logit_norm_ce_vs_logitnorm.png" in report["plots"]
    # Each finished run is published: loaded by name, its file hash-checked, and
    # evaluated by name with the run's own settings.
    from ood_jax import pretrained

    published = work / "report" / "checkpoints"
    names = pretrained.available(published)
    assert names == [f"cifar10/tiny/{n}" for n in ("ce/seed0", "logitnorm/seed0", "oe/seed0")]
    assert pretrained.info(names[0], published)["test_accuracy"] == acc
    out = tmp_path / "published_eval"
    evaluated = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--pretrained={names[0]}"]
        + [f"--out_dir={out}", f"--data={tmp_path}"],
        cwd=ROOT,
        env={**env, "OOD_JAX_PRETRAINED": str(published)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again_results = json.loads((out / "results.json").read_text())
    assert again_results["classification"]["accuracy"] == acc
    assert again_results["checkpoint"]["published"] == names[0]
    msp = again_results["ood"]["papers"]["metrics"]["msp"]["gaussian"]["auroc"]["mean"]
    assert msp == ce["ood"]["papers"]["metrics"]["msp"]["gaussian"]["auroc"]["mean"]
    # Again: nothing to train, the finished runs are skipped.
    again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 of 3 runs done, 0 to go" in again.stdout  # of the --only runs


def test_a_claim_needs_more_than_the_spread_and_one_point():
    from experiments.study.report.claims import _verdict

    def stat(mean, std=0.0, n=1):
        return {"mean": mean, "std": std, "n": n}

    # One seed each (spread 0): 0.1 point is not "better"; 1.5 points is.
    assert _verdict((stat(0.796), stat(0.797))) == "does not hold"
    assert _verdict((stat(0.780), stat(0.795))) == "holds"
    # Three seeds: the difference must also exceed the combined standard deviations.
    assert _verdict((stat(0.70, 0.02, 3), stat(0.73, 0.02, 3))) == "does not hold"
    assert _verdict((stat(0.70, 0.005, 3), stat(0.73, 0.005, 3))) == "holds"
    assert _verdict((stat(0.70, n=0), stat(0.73))) == "not measured"


def test_density_split_averages_the_real_sets_then_the_seeds():
    from experiments.study.report.density import density_split, density_split_summary
    from experiments.study.report.runs import REAL

    def results(seed, id_rest, ood_rest):
        split = {}
        for variant in ("raw", "l2"):
            split[variant] = {"cifar": {p: {"q50": 10.0} for p in ("total", "top", "rest")}}
            split[variant]["cifar"]["rest"] = {"q50": id_rest}
            for i, s in enumerate(REAL):
                split[variant][s] = {p: {"q50": 1.0} for p in ("total", "top")}
                split[variant][s]["rest"] = {"q50": ood_rest + i}
        metrics = {"msp": {s: {} for s in REAL}}
        return {
            "run": study.Run(f"ce/seed{seed}", "ce", seed),
            "results": {
                "data": {"id": {"name": "cifar"}},
                "ood": {"papers": {"metrics": metrics}},
                "diagnostics": {
                    "mahalanobis_split": split,
                    "features": {
                        n: {"feature_norm": {"q50": 2.0 if n in REAL else 3.0}}
                        for n in ("cifar", *REAL)
                    },
                },
            },
        }

    main = {"ce": [results(0, 4.0, 5.0), results(1, 6.0, 7.0)]}
    row = density_split(main)["ce"]
    id_rest, ood_rest = row["raw/rest"]
    # OOD: per seed the mean over the three sets (5+6+7)/3 = 6 and (7+8+9)/3 = 8.
    assert ood_rest["values"] == [6.0, 8.0] and ood_rest["std"] == 1.0
    assert id_rest["mean"] == 5.0
    text = density_split_summary({"ce": row})[0]
    assert "carry 50%" in text and "ratio 1.40" in text  # 5/10 of the total; 7/5
    assert density_split(main)["ce"]["norm"][1]["mean"] == 2.0
    # A run evaluated before the split existed is left out, not counted as zero.
    del main["ce"][1]["results"]["diagnostics"]["mahalanobis_split"]
    assert density_split(main)["ce"]["raw/rest"][0]["n"] == 1


def test_openood_rows_recompute_the_saved_scores_by_hand(tmp_path):
    from experiments.study.report.tables import openood_rows

    rng = np.random.default_rng(0)
    id_s = rng.normal(1.0, 1.0, 100)
    ood_s = rng.normal(0.0, 1.0, 20)  # 20 = 100 // 5: the set is used whole, once
    path = tmp_path / "scores.npz"
    np.savez(path, **{"id/msp": id_s, "ood/textures_partial/msp": ood_s})
    options = {"num_ood": None, "num_draws": 10, "seed": 0}
    entry = {
        "run": study.Run("ce/seed0", "ce", 0),
        "results": {"protocol_options": options},
        "scores_path": str(path),
    }
    row = openood_rows({"ce": [entry]})["ce"]
    # OOD positive, ranked by -score: the first threshold with 19 of 20 OOD flagged.
    t = np.sort(-ood_s)[::-1][18]
    fpr = np.mean(-id_s >= t)
    assert row["real/fpr95"]["mean"] == pytest.approx(fpr)
    auroc = np.mean([(i > o) + 0.5 * (i == o) for i in id_s for o in ood_s])
    assert row["real/auroc"]["mean"] == pytest.approx(auroc)
    assert row["synthetic/auroc"]["n"] == 0  # no synthetic set saved


def _fake_run(method, seed, acc, fpr=0.8, mmc=0.9, lr=0.4, epochs=5, sweep=None, tau=None):
    """The parts of a run's results.json that ``study.report.claims`` reads; ``sweep``
    names a sweep run (``sweep/<sweep>/seed<seed>``)."""
    if sweep:
        run = study.Run(f"sweep/{sweep}/seed{seed}", method, seed, group="sweep")
    else:
        run = study.Run(f"{method}/seed{seed}", method, seed)
    cells = {"fpr95": fpr, "auroc": 0.7, "aupr_in": 0.9}
    sets = {"textures_partial": {k: {"mean": v} for k, v in cells.items()}}
    results = {
        "classification": {"accuracy": acc, "ece": 0.02},
        "ood": {"papers": {"metrics": {"msp": sets}}},
        "data": {"id": {"name": "cifar10"}},
        "mmc": {"cifar10": mmc, "lowpass_uniform": 0.4, "permuted_pixels": 0.6},
        "config": {
            "optim": {"lr": lr},
            "train": {"epochs": epochs},
            "objective": {"hparams": {} if tau is None else {"temperature": tau}},
        },
        "diagnostics": {  # read by the Pearce et al. claims
            "weights": {"cosine": {"mean": -0.11}, "optimal_cosine": -1 / 9, "num_classes": 10},
            "features": {"cifar10": {"feature_norm": {"q50": 5.0}}},
        },
    }
    return {"run": run, "results": results}


def test_logitnorm_claim_names_the_seeds_at_ce_accuracy():
    from experiments.study.report.claims import claims

    main = {
        "ce": [_fake_run("ce", 0, 0.79, 0.78), _fake_run("ce", 1, 0.79, 0.78)],
        "logitnorm": [
            _fake_run("logitnorm", 0, 0.67, 0.90),
            _fake_run("logitnorm", 1, 0.795, 0.83),
        ],
    }
    (claim,) = [c for c in claims(main) if c["paper"].startswith("LogitNorm")]
    assert claim["verdict"] == "not comparable"  # mean accuracy 73.25 vs 79.0
    ev = claim["evidence"]
    assert "seed 0 67.0% / 90.0, seed 1 79.5% / 83.0" in ev
    # Only seed 1 is within 2 points of CE's 79.0%: 83.0 - 78.0 = +5.0.
    assert "differs from CE's mean by seed 1 +5.0 points" in ev


def test_logitnorm_claim_reads_the_sweep_against_ce_at_the_same_budget():
    from experiments.study.report.claims import claims

    main = {
        "ce": [_fake_run("ce", 0, 0.79, 0.78)],
        "logitnorm": [_fake_run("logitnorm", 0, 0.67, 0.90, tau=0.04)],
    }
    runs = [
        _fake_run("ce", 0, 0.84, 0.75, epochs=10, sweep="ce_epochs2x"),
        _fake_run("logitnorm", 0, 0.83, 0.70, epochs=10, sweep="logitnorm_epochs2x", tau=0.04),
        _fake_run("logitnorm", 0, 0.70, 0.85, sweep="logitnorm_tau0.2", tau=0.2),
        _fake_run("logitnorm", 0, 0.80, 0.80, lr=0.1, sweep="logitnorm_lr0.1", tau=0.04),
    ]
    sweep = {e["run"].name: e for e in runs}
    (claim,) = [c for c in claims(main, sweep) if c["paper"].startswith("LogitNorm")]
    ev = claim["evidence"]
    # 10 epochs: against the 10-epoch CE run, 70 - 75 = -5.0, 83 vs 84 within 2 points.
    assert (
        "sweep/logitnorm_epochs2x/seed0 (10 epochs, tau 0.04): 83.0% / 70.0 vs "
        "sweep/ce_epochs2x/seed0 84.0% / 75.0 (FPR95 -5.0 points, accuracy within 2 points)"
    ) in ev
    # 5 epochs at lr 0.4: against the main CE runs, 85 - 78 = +7.0, 70 vs 79 not close.
    assert (
        "sweep/logitnorm_tau0.2/seed0 (5 epochs, tau 0.2): 70.0% / 85.0 vs the main CE runs "
        "79.0% / 78.0 (FPR95 +7.0 points, accuracy differs by more than 2 points)"
    ) in ev
    assert "sweep/logitnorm_lr0.1/seed0: no CE run at 5 epochs, lr 0.1" in ev


def test_noise_claims_show_the_id_confidence_per_seed():
    from experiments.study.report.claims import claims

    main = {
        "ce": [_fake_run("ce", 0, 0.79, mmc=0.81)],
        "ceda": [_fake_run("ceda", 0, 0.71, mmc=0.726), _fake_run("ceda", 1, 0.38, mmc=0.274)],
    }
    (claim,) = [c for c in claims(main) if c["claim"].startswith("CEDA")]
    # (72.6 + 27.4) / 2 = 50.0; population std 22.6.
    assert (
        "MMC on the ID test images 50.0 ± 22.6 (per seed 72.6, 27.4) vs 81.0" in claim["evidence"]
    )


def test_study_scores_flag_names_an_unknown_score_in_one_line(tmp_path, capsys):
    from experiments import cli
    from experiments.study.__main__ import main

    argv = [f"--workdir={tmp_path}", "--scores=knn,bogus", "--preset=smoke"]
    with pytest.raises(SystemExit) as stop:
        cli.run_main(main, argv)
    assert stop.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "unknown score(s) 'bogus'" in err[0], err
    assert not (tmp_path / "study.jsonl").exists()  # stopped before any run


def test_report_scores_cover_every_score_the_report_reads():
    # --scores always adds REPORT_SCORES: they must include each method's own score,
    # the logit-shift table's and the density split's (named in the report modules).
    from experiments.study.plan import REPORT_SCORES
    from experiments.study.report.density import DENSITY

    headline = {methods.get(m).headline_score for m in methods.STUDY_ORDER}
    needed = headline | set(DENSITY) | {"msp", "energy", "max_logit"}
    assert needed <= set(REPORT_SCORES), needed - set(REPORT_SCORES)
