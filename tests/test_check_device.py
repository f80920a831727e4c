"""The first command on a new machine (experiments.check_device), on CPU with the smoke preset."""

import json

import pytest

from experiments import check_device


def test_device_kinds_map_to_the_plans_chips():
    assert check_device.chip_of("NVIDIA H100 80GB HBM3") == "h100"
    assert check_device.chip_of("NVIDIA A100-SXM4-40GB") == "a100"
    assert check_device.chip_of("TPU v5 lite") == "v5e"
    assert check_device.chip_of("TPU v6 lite") == "v6e"
    assert check_device.chip_of("cpu") is None


def test_the_plans_estimate_is_scaled_to_this_machines_devices(tmp_path):
    row = {
        "method": "ce",
        "preset": "paper",
        "precision": "float32",
        "topology": "h100:8",
        "devices": 8,
        "estimate": {"images_per_s": 80_000.0},
    }
    other = {**row, "precision": "bfloat16", "estimate": {"images_per_s": 1.0}}
    (tmp_path / "gpu_plan.json").write_text(json.dumps({"rows": [other, row]}))
    got = check_device.planned_images_per_s("ce", "paper", "h100", "float32", 2, plans=tmp_path)
    assert got == {"images_per_s": 20_000.0, "row": "h100:8, 8 devices"}  # 80,000 * 2 / 8
    assert check_device.planned_images_per_s("ce", "paper", "a100", "float32", 1, tmp_path) is None


def test_failures_are_one_line_naming_what_to_try():
    oom = check_device.diagnose(RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8GB"))
    assert oom.startswith("out of memory") and "batch_size" in oom
    tile = check_device.diagnose(RuntimeError("INTERNAL: Couldn't find output tile sizes"))
    assert "xla_gpu_enable_triton_gemm=false" in tile


@pytest.mark.slow
def test_smoke_check_trains_every_chosen_method_and_runs_the_evaluation(tmp_path, capsys):
    argv = ["--preset", "smoke", "--methods", "ce,oe,acet", "--steps", "2", "--out", str(tmp_path)]
    report = check_device.main(argv)
    assert report["environment"]["backend"] == "cpu"
    assert any("no accelerator found" in w for w in report["warnings"])
    for method in ("ce", "oe", "acet"):
        row = report["training"][method]
        assert row["images_per_s"] > 0 and row["batch"] == 64, row
    assert set(report["evaluation"]["programs"]) == {"forward", "odin", "attack chunk"}
    saved = json.loads((tmp_path / "check_device.json").read_text())
    assert saved["training"]["oe"]["images_per_s"] == report["training"]["oe"]["images_per_s"]
    assert "| acet | tiny | 64 |" in (tmp_path / "check_device.md").read_text()


def test_bad_methods_are_one_line_and_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        check_device.main(["--methods", "cee", "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "--methods cee: choose from" in capsys.readouterr().err


def test_a_check_stopped_before_its_end_keeps_the_methods_it_measured(tmp_path, monkeypatch):
    row = {"batch": 64, "model": "tiny", "compile_s": 1.0, "step_s": 0.01, "images_per_s": 6400.0}
    monkeypatch.setattr(check_device, "check_training", lambda *args: dict(row))

    def stopped(*args):
        raise SystemExit(143)  # SIGTERM from a time limit, during the evaluation part

    monkeypatch.setattr(check_device, "check_evaluation", stopped)
    with pytest.raises(SystemExit):
        check_device.main(["--methods", "ce,logitnorm", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "check_device.json").read_text())
    assert set(saved["training"]) == {"ce", "logitnorm"} and saved["evaluation"] is None
    text = (tmp_path / "check_device.md").read_text()
    assert "| logitnorm | tiny | 64 | 1.0 | 10.0 | 6,400 |" in text
    assert "- not run: the check stopped before it" in text
