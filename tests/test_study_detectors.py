"""The study's detector table: which checkpoints, and the numbers in each cell."""

import json
import os
import sys

import numpy as np
import pytest

from experiments import cli
from experiments.study import detectors
from experiments.study.report.runs import REAL


def _results(values: dict[str, dict[str, list[float]]]) -> dict:
    """A results.json with, per score, one (auroc, fpr95) per real set."""
    metrics = {
        score: {
            s: {"auroc": {"mean": a}, "fpr95": {"mean": f}}
            for s, (a, f) in zip(REAL, per_set, strict=True)
        }
        for score, per_set in values.items()
    }
    return {"ood": {"papers": {"metrics": metrics}}}


def test_study_checkpoints_are_the_main_runs_without_sweeps():
    names = detectors.study_checkpoints()
    assert names and not any("/sweep/" in n or "/regime/" in n for n in names)
    assert all(len(n.split("/")) == 4 for n in names)  # <data>/<model>/<method>/seed<k>
    assert {n.split("/")[-2] for n in names} >= {"ce", "logitnorm", "l2norm"}
    only = detectors.study_checkpoints(["ce"])
    assert only and all(n.split("/")[-2] == "ce" for n in only)
    with pytest.raises(cli.UsageError, match="nope"):
        detectors.study_checkpoints(["nope"])


def test_cells_are_set_means_then_seed_mean_and_std(tmp_path):
    rng = np.random.default_rng(0)
    draws = rng.uniform(size=(2, 2, len(REAL), 2))  # seed, score, set, (auroc, fpr95)
    names = [f"d/m/ce/seed{k}" for k in range(2)]
    for k, name in enumerate(names):
        os.makedirs(tmp_path / name)
        values = {s: [tuple(v) for v in draws[k, j]] for j, s in enumerate(("msp", "vim"))}
        (tmp_path / name / "results.json").write_text(json.dumps(_results(values)))
    table = detectors.collect(str(tmp_path), [*names, "d/m/ce/seed9"])  # seed9: not evaluated
    for j, score in enumerate(("msp", "vim")):
        for m, metric in enumerate(("auroc", "fpr95")):
            per_seed = [draws[k, j, :, m].sum() / len(REAL) for k in range(2)]
            cell = table["ce"][score][metric]
            assert cell["n"] == 2
            np.testing.assert_allclose(cell["mean"], (per_seed[0] + per_seed[1]) / 2)
            np.testing.assert_allclose(cell["std"], abs(per_seed[0] - per_seed[1]) / 2)
    text = detectors.markdown(table, {"date": "today"})
    row = next(line for line in text.splitlines() if line.startswith("| vim |"))
    expected = 100 * np.mean([draws[k, 1, :, 0].mean() for k in range(2)])
    assert f"{expected:.1f} ±" in row and "88.68 / 93.48" in row  # OpenOOD's ViM beside


def test_a_score_one_seed_skipped_is_the_other_seeds_mean(tmp_path):
    # The evaluation skips a score with NaN or infinite values for that model only.
    both = {"msp": [(0.6, 0.5)] * len(REAL), "scale": [(0.8, 0.3)] * len(REAL)}
    names = ["d/m/l2norm/seed0", "d/m/l2norm/seed1"]
    for name, values in zip(names, (both, {"msp": [(0.7, 0.4)] * len(REAL)}), strict=True):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "results.json").write_text(json.dumps(_results(values)))
    table = detectors.collect(str(tmp_path), names[::-1])  # the seed without scale first
    assert table["l2norm"]["scale"]["auroc"]["n"] == 1
    np.testing.assert_allclose(table["l2norm"]["scale"]["auroc"]["mean"], 0.8)
    np.testing.assert_allclose(table["l2norm"]["msp"]["auroc"]["mean"], 0.65)


def test_a_failed_evaluation_costs_its_row_only_and_ctrl_c_stops_the_run(tmp_path, monkeypatch):
    def command(name, out):
        path = os.path.join(out, name, detectors.RESULTS)
        code = {"fails": "raise SystemExit(2)", "ctrl_c": "raise SystemExit(130)"}.get(
            name.split("/")[0],
            f"import os; os.makedirs({os.path.dirname(path)!r}); open({path!r}, 'w').write('{{}}')",
        )
        return [sys.executable, "-c", code]

    monkeypatch.setattr(detectors, "evaluate_command", command)
    out = str(tmp_path)
    names = ["ok1/ce/seed0", "fails/ce/seed0", "ok2/ce/seed0"]
    assert detectors.run(out, names) == ["fails/ce/seed0"]
    assert all(
        os.path.exists(os.path.join(out, n, detectors.RESULTS))
        for n in ("ok1/ce/seed0", "ok2/ce/seed0")
    )
    with pytest.raises(KeyboardInterrupt):
        detectors.run(out, ["ctrl_c/ce/seed0", "ok3/ce/seed0"])
    assert not os.path.exists(os.path.join(out, "ok3/ce/seed0"))
