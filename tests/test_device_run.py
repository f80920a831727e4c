"""The GPU machine's prepared command (benchmarks/device/): the data it carries, the
commands it builds, its time limits, and what comes back; on CPU, without the machine."""

import io
import json
import re
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from benchmarks.device import carry, collect, run
from experiments import train
from experiments.configs.default import get_config
from experiments.data import load_splits
from ood_jax import data as D

# The limits on what comes back from $OUT (the device tool's README).
MAX_FILES, NAME = 8, re.compile(r"^[A-Za-z0-9._-]+$")


def test_the_presets_batches_images_and_lr_drops_are_the_configs():
    for preset, batch in run.PRESET_BATCH.items():
        assert get_config(preset).train.batch_size == batch
    assert get_config("smoke").data.train_limit == run.SMOKE_TRAIN_IMAGES
    paper = get_config("paper")
    assert paper.train.epochs == run.PAPER_EPOCHS
    assert run.lr_drops(run.PAPER_EPOCHS) == tuple(paper.optim.boundaries_epochs)  # 80, 140
    assert run.lr_drops(10) == (4, 7) and run.lr_drops(1) == (1, 2)


def test_epochs_are_what_the_seconds_allow_at_the_checks_speed():
    row = {"images_per_s": 10_000.0, "compile_s": 20.0}
    # fixed 20 + 1.3 * 20 = 46 s; at 0.6 * 10,000 = 6,000 images/s an epoch takes
    # 10,000 / 6,000 + 10,000 / 18,000 + 0.5 = 2.722 s: (155 - 46) / 2.722 = 40.04
    assert run.estimate_epochs(155.0, row, 10_000, fallback=7, most=200) == 40
    assert run.estimate_epochs(155.0, row, 10_000, fallback=7, most=30) == 30
    # two runs at once: 6,000 / 2**0.75 = 3,567.6 images/s each, 4.237 s an epoch: 25.7
    assert run.estimate_epochs(155.0, row, 10_000, fallback=7, most=200, sharing=2) == 25
    assert run.estimate_epochs(10.0, row, 10_000, fallback=7, most=200) == 1
    assert run.estimate_epochs(155.0, {"error": "oom"}, 10_000, fallback=7, most=200) == 7
    assert run.estimate_epochs(155.0, None, 10_000, fallback=7, most=5) == 5


def test_the_training_command_is_accepted_by_the_runner_as_intended(tmp_path):
    argv = run.train_command(
        "logitnorm", tmp_path / "ln", preset="paper", epochs=30, train_images=10_000, on_device=True
    )
    assert argv[:3] == [sys.executable, "-m", "experiments.cifar10_logitnorm"]
    settings, workdir = train.parse_args(argv[3:], method="logitnorm", description="")
    c = settings.config
    assert workdir == str(tmp_path / "ln")
    assert (c.preset, c.model.name, c.objective.name) == ("paper", "wrn40_2", "logitnorm")
    assert (c.data.source, c.data.train_limit, c.data.on_device) == ("local", 10_000, True)
    assert c.train.epochs == 30 and tuple(c.optim.boundaries_epochs) == (12, 21)
    # every 5 epochs (30 / 6 measured) of 10,000 // 128 = 78 steps, all kept
    assert c.train.checkpoint_every == 5 * 78 and c.train.max_to_keep == 30 // 5 + 2
    assert c.eval.ood is False and c.train.progress is False


def _encoded_npz(path, n, seed):
    """An offline-format file of ``n`` random 32x32 JPEGs, labels ``i % 10``."""
    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.concatenate([[0], np.cumsum([b.size for b in blobs])]).astype(np.int64)
    np.savez(
        path,
        encoded=np.concatenate(blobs),
        offsets=offsets,
        labels=(np.arange(n) % 10).astype(np.int32),
        label_names=np.array([f"c{i}" for i in range(10)]),
    )


def test_the_carried_subset_is_the_runs_train_limit_subset_image_for_image(tmp_path):
    full, carried = tmp_path / "full", tmp_path / "carried"
    full.mkdir()
    _encoded_npz(full / "cifar10_train.npz", 40, seed=1)
    _encoded_npz(full / "cifar10_test.npz", 12, seed=2)
    assert carry.write_split(full / "cifar10_train.npz", carried / "cifar10_train.npz", 15) == 15
    assert carry.write_split(full / "cifar10_test.npz", carried / "cifar10_test.npz", 0) == 12
    with np.load(full / "cifar10_train.npz") as src, np.load(carried / "cifar10_train.npz") as got:
        rows = np.sort(np.random.default_rng(0).choice(40, 15, replace=False))  # by hand
        np.testing.assert_array_equal(got["labels"], src["labels"][rows])
        for i, r in enumerate(rows):
            a, b = got["offsets"][i : i + 2], src["offsets"][r : r + 2]
            assert got["encoded"][a[0] : a[1]].tobytes() == src["encoded"][b[0] : b[1]].tobytes()
    config = get_config("smoke")
    config.data.source, config.data.train_limit, config.data.test_limit = "local", 15, 0
    want_train, want_test = load_splits(config, data_dir=str(full))
    got_train, got_test = load_splits(config, data_dir=str(carried))
    np.testing.assert_array_equal(got_train.images, want_train.images)
    np.testing.assert_array_equal(got_train.labels, want_train.labels)
    np.testing.assert_array_equal(got_test.images, want_test.images)
    mtime = (carried / "cifar10_train.npz").stat().st_mtime_ns
    carry.write_split(full / "cifar10_train.npz", carried / "cifar10_train.npz", 15)
    assert (carried / "cifar10_train.npz").stat().st_mtime_ns == mtime  # kept, not redone
    assert isinstance(D.load_dataset("cifar10_jpeg", "test", data_dir=carried), D.ImageDataset)


def test_a_step_past_its_limit_is_stopped_with_sigterm_and_logged(tmp_path):
    steps = run.Steps(tmp_path, deadline=run.time.monotonic() + 60)
    code = "import time; print('started', flush=True); time.sleep(30)"
    record = steps.run("sleeper", [sys.executable, "-c", code], {}, limit=2)
    assert record["timed_out"] and record["rc"] == -15 and record["output"] == ["started"]
    assert "output" not in steps.records[0]  # what steps.json keeps
    assert "=== sleeper: rc -15" in (tmp_path / "run.log").read_text()


def test_steps_run_together_at_once_their_lines_tagged(tmp_path):
    steps = run.Steps(tmp_path, deadline=run.time.monotonic() + 60)
    code = "import time; time.sleep(1.5); print('done')"
    jobs = [(name, [sys.executable, "-c", code], {}) for name in ("a", "b")]
    start = run.time.monotonic()
    records = steps.run_together(jobs, limit=30)
    assert run.time.monotonic() - start < 2.9  # not one after the other
    assert [(r["step"], r["rc"], r["output"]) for r in records] == [
        ("a", 0, ["done"]),
        ("b", 0, ["done"]),
    ]
    log = (tmp_path / "run.log").read_text()
    assert "[a] done" in log and "[b] done" in log


def _finished_work(work, methods):
    (work / "check_device").mkdir(parents=True)
    check = {
        "environment": {"device_kind": "NVIDIA H100 80GB HBM3"},
        "training": {"ce": {"images_per_s": 9000.0, "compile_s": 20.0}, "logitnorm": {}},
    }
    (work / "check_device" / "check_device.json").write_text(json.dumps(check))
    (work / "check_device" / "check_device.md").write_text("# Device check\n")
    for method in methods:
        (work / method / "tensorboard" / "train").mkdir(parents=True)
        (work / method / "tensorboard" / "train" / "events").write_text("x")
        (work / method / "metrics.jsonl").write_text(json.dumps({"step": 78, "epoch": 1.0}) + "\n")
        (work / method / "final.json").write_text(json.dumps({"step": 78, "test_accuracy": 0.5}))
        record = {"train_clean_accuracy": 0.6, "test_ece": 0.03, "test_msp": 0.55}
        (work / method / "regime.jsonl").write_text(json.dumps(record) + "\n")


def test_what_comes_back_fits_the_limits_and_lands_where_it_is_committed(tmp_path):
    work, out, repo = tmp_path / "work", tmp_path / "out", tmp_path / "repo"
    methods = ["ce", "logitnorm"]
    _finished_work(work, methods)
    (out / "weights").mkdir(parents=True)
    for name in ("manifest.json", "ce.npz", "logitnorm.npz"):
        (out / "weights" / name).write_text("{}")
    (out / "run.log").write_text("log\n")
    state = {
        "command": "python -m benchmarks.device.run",
        "date": "today",
        "gpu": "NVIDIA H100 80GB HBM3",
        "libs": "pins",
        "versions": {},
        "methods": methods,
        "epochs": {"ce": 3, "logitnorm": 3},
        "steps": [{"step": "train ce", "rc": 0, "seconds": 1.0, "limit_s": 9, "timed_out": False}],
        "wall_s": 5.0,
    }
    run.pack(out, work, state)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= MAX_FILES
    assert all(len(p.relative_to(out).parts) <= 3 and NAME.match(p.name) for p in files)
    summary = (out / "summary.md").read_text()
    assert "| ce | 3 | 1.0 | 50.00% | 60.00% | 3.00% | 55.00% |" in summary
    line = run.one_line(work, state)
    assert "check_device 1/2 methods ok" in line and "ce 1.0/3 epochs, test acc 0.5000" in line
    written = collect.collect(out, repo)
    gpu = repo / "results" / "regime_study" / "gpu"
    assert (repo / "benchmarks" / "results" / "check_device_h100.md").is_file()
    assert {p.name for p in (gpu / "logitnorm").iterdir()} == {
        "metrics.jsonl",
        "final.json",
        "regime.jsonl",
    }
    assert (gpu / "summary.md").is_file() and (
        repo / "runs" / "gpu" / "weights" / "ce.npz"
    ) in written
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "ce/tensorboard/train/events" in tar.getnames()


@pytest.mark.parametrize("smoke", [True, False])
def test_children_get_the_carried_packages_first(tmp_path, smoke):
    for group in ("pins", "extra"):
        (tmp_path / group).mkdir()
    env = run.child_env(tmp_path, "pins", smoke=smoke)
    assert env["PYTHONPATH"].split(":") == [str(tmp_path / "pins"), str(tmp_path / "extra")]
    assert run.child_env(tmp_path, "image", smoke=smoke)["PYTHONPATH"] == str(tmp_path / "extra")
    assert (env.get("OOD_JAX_DEFAULT_XLA_FLAGS") == "0") is (not smoke)


class _Steps:
    """Steps whose probes pass only with the libraries named."""

    def __init__(self, passing):
        self.passing, self.names = passing, []

    def run(self, name, argv, env, limit):
        self.names.append(name)
        ok = not name.startswith("probe") or name == f"probe ({self.passing})"
        return {"rc": 0 if ok else 1, "output": ['{"flax": "0.12.8"}']}


def test_the_images_libraries_are_used_when_the_pins_do_not_train(tmp_path):
    (tmp_path / "pins").mkdir()
    steps, found = _Steps("image"), {}
    assert run.choose_libs(steps, tmp_path, tmp_path, found, smoke=True) == "image"
    assert steps.names == ["versions (pins)", "probe (pins)", "versions (image)", "probe (image)"]
    assert found == {"pins": {"flax": "0.12.8"}, "image": {"flax": "0.12.8"}}
    assert run.choose_libs(_Steps("pins"), tmp_path, tmp_path, {}, smoke=True) == "pins"
    assert run.choose_libs(_Steps("none"), tmp_path, tmp_path, {}, smoke=True) is None
    (tmp_path / "pins").rmdir()  # no pins carried: the image's, probed once
    assert run.choose_libs(_Steps("image"), tmp_path, tmp_path, {}, smoke=True) == "image"


@pytest.mark.slow
def test_the_smoke_run_goes_through_every_step_and_returns_its_files(tmp_path, monkeypatch):
    shared = D.default_data_dir()
    data = tmp_path / "carried"
    carry.write_split(shared / "cifar10_train.npz", data / "cifar10_train.npz", 2000)
    carry.write_split(shared / "cifar10_test.npz", data / "cifar10_test.npz", 0)
    monkeypatch.setenv("OOD_JAX_DATA_DIR", str(data))
    out = tmp_path / "out"
    argv = ["--smoke", "--methods=logitnorm", f"--out={out}", f"--site={tmp_path / 'site'}"]
    assert run.main([*argv, f"--work={tmp_path / 'work'}", "--minutes=5"]) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == [
        "results.tar.gz",
        "run.log",
        "summary.md",
        "weights/logitnorm.npz",
        "weights/manifest.json",
    ]
    with tarfile.open(out / "results.tar.gz") as tar:
        steps = json.load(tar.extractfile("steps.json"))
        final = json.load(tar.extractfile("logitnorm/final.json"))
        regime = tar.extractfile("logitnorm/regime.jsonl").read().decode().splitlines()
        assert "check_device/check_device.md" in tar.getnames()
    assert [s["rc"] for s in steps["steps"]] == [0] * 6 and steps["libs"] == "image"
    assert final["step"] == 32 and len(regime) == 2  # 2 epochs of 1,024 / 64, both measured
    entry = json.loads((out / "weights" / "manifest.json").read_text())["logitnorm"]
    assert (entry["step"], entry["test_accuracy"]) == (32, final["test_accuracy"])
    assert "| logitnorm | 2 | 2.0 |" in (out / "summary.md").read_text()


def test_a_run_without_checkpoints_is_reported_and_the_others_still_exported(tmp_path, capsys):
    from benchmarks.device import export

    rc = export.main(["--to", str(tmp_path / "weights"), "--run", f"ce={tmp_path / 'none'}"])
    assert rc == 1 and "ce: not exported: UsageError" in capsys.readouterr().err
