"""Users' paths through the command line: their own OOD sets, and bad input or faults that
must end in one line naming the flag or file (exit 2; Ctrl-C: 130), nothing written or lost.

One tiny run is trained through the training entry point (with the user's own OOD sets in
its end-of-training report); the evaluation command and the fault cases reuse it.
"""

import json
import os
import shutil
import signal

import numpy as np
import pytest
from PIL import Image
from toy_models import write_cifar_split

import experiments.evaluation
from experiments import evaluate, train
from ood_jax import pretrained
from ood_jax.checkpoint import Checkpointer

pytestmark = pytest.mark.slow

RUN_ARGS = [
    "--preset=smoke",
    "--config.data.train_limit=0",
    "--config.data.test_limit=0",
    "--config.data.eval_batch_size=32",
    "--config.train.batch_size=32",
    "--config.train.epochs=1",  # 4 steps
    "--config.train.checkpoint_every=2",  # checkpoints 2 and 4
    "--config.train.progress=false",
    "--config.eval.ood=true",
    "--config.eval.scores=msp",
    "--config.eval.protocols=full",
    "--config.eval.num_draws=1",
    "--config.eval.adversarial_noise=0",
]


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """The user's data: CIFAR-like splits and three OOD sets of known images."""
    root = tmp_path_factory.mktemp("own")
    write_cifar_split(root, "train", 128, seed=1)
    write_cifar_split(root, "test", 32, seed=2)
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (7, 32, 32, 3)).astype(np.uint8)
    np.savez(root / "rgb.npz", images=rgb, labels=np.full(7, -1, np.int32))
    gray = rng.integers(0, 256, (5, 32, 32)).astype(np.uint8)  # docs/data.md's [N, 32, 32]
    np.savez(root / "gray.npz", images=gray, labels=np.full(5, -1, np.int32))
    pngs = rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8)
    for i, image in enumerate(pngs):
        folder = root / "set" / "test" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i}.png")
    return root, {"rgb": rgb, "gray": np.repeat(gray[..., None], 3, -1), "pngs": pngs}


def _run_main(argv):
    return train.main(argv, method="ce")


@pytest.fixture(scope="module")
def run(own, tmp_path_factory):
    root, _ = own
    workdir = tmp_path_factory.mktemp("runs") / "ce"
    sets = f"npz:{root / 'rgb.npz'},{root / 'gray.npz'},folder:{root / 'set'}"
    _run_main(
        [f"--workdir={workdir}", f"--data={root}", *RUN_ARGS, f"--config.eval.ood_sets={sets}"]
    )
    return workdir


def _msp(workdir, images):
    """Max softmax of the run's model, computed here from the logits with NumPy."""
    from ood_jax.data import CIFAR10_MEAN, CIFAR10_STD

    model, _, _ = evaluate.restore_model(str(workdir))
    x = (images.astype(np.float32) / 255.0 - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD)
    logits = np.asarray(model(x.astype(np.float32))[0], np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)).max(-1)


def _ood_scores(report_dir, name):
    with np.load(os.path.join(report_dir, "scores.npz")) as saved:
        keys = [k for k in saved.files if k.startswith(f"ood/{name}/msp")]
        return saved[sorted(keys)[0]]


def test_own_ood_sets_in_the_training_report(run, own):
    root, images = own
    results = json.loads((run / "eval" / "results.json").read_text())
    ood = results["data"]["ood"]
    rgb, gray, folder = f"npz:{root / 'rgb.npz'}", str(root / "gray.npz"), f"folder:{root / 'set'}"
    assert list(ood) == [rgb, gray, folder]
    assert [ood[n]["num_examples"] for n in (rgb, gray, folder)] == [7, 5, 6]
    for name, pixels in ((rgb, images["rgb"]), (gray, images["gray"])):
        np.testing.assert_allclose(
            _ood_scores(run / "eval", name), _msp(run, pixels), rtol=1e-4, atol=1e-5
        )
    # The folder's images in sorted class/file order.
    order = sorted(range(6), key=lambda i: (i % 2, str(i)))
    np.testing.assert_allclose(
        np.sort(_ood_scores(run / "eval", folder)),
        np.sort(_msp(run, images["pngs"][order])),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("how", ["--ood_sets", "--config.eval.ood_sets"])
def test_own_ood_sets_from_the_evaluation_command(run, own, tmp_path, how):
    root, images = own
    sets = f"{root / 'rgb.npz'},folder:{root / 'set'}:test"
    out = tmp_path / "report"
    results = evaluate.main(
        [f"--workdir={run}", f"--data={root}", f"{how}={sets}", f"--out_dir={out}"]
    )
    assert list(results["data"]["ood"]) == sets.split(",")
    np.testing.assert_allclose(
        _ood_scores(out, str(root / "rgb.npz")), _msp(run, images["rgb"]), rtol=1e-4, atol=1e-5
    )
    assert results["data"]["ood"][f"folder:{root / 'set'}:test"]["num_examples"] == 6


def test_evaluation_command_tunes_on_a_validation_set_never_a_test_set(run, own, tmp_path, capsys):
    root, _ = own
    out = tmp_path / "tuned"
    grid = "--config.eval.tune_grids.msp.temperature=1,10"
    argv = [f"--workdir={run}", f"--data={root}", "--tune=msp", grid]
    results = evaluate.main(
        [*argv, "--tune_ood=uniform", f"--out_dir={out}", "--config.eval.val_size=32"]
    )
    record = results["tuning"]["msp"]
    assert [c["hparams"]["temperature"] for c in record["candidates"]] == [1.0, 10.0]
    assert [k for k in results["scores"] if k.startswith("msp")] == [record["key"]]
    assert results["data"]["val_ood"]["name"] == "uniform_noise"
    assert results["data"]["val_id"]["num_examples"] == 32 and results["data"]["train"] is None
    assert "## Hyperparameters chosen on validation" in (out / "results.md").read_text()
    test_set = f"--tune_ood=npz:{root / 'rgb.npz'}"
    err = _one_line(capsys, evaluate.main, [*argv, test_set, f"--out_dir={tmp_path / 'no'}"])
    assert err.startswith("error: config.eval.tune_ood: ") and "never chosen on a test set" in err
    assert not (tmp_path / "no").exists()


def _one_line(capsys, main, argv, code=2):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("--config.eval.ood_sets=npz:/no/such/own.npz", "/no/such/own.npz"),
        ("--config.eval.ood_sets=/no/such/own.npz", "/no/such/own.npz"),
        ("--config.eval.ood_sets=folder:/no/such/root", "/no/such/root"),
        ("--config.eval.ood_sets=5,gaussian", "config.eval.ood_sets"),
        ("--config.eval.ood_sets=[1]", "config.eval.ood_sets"),
        ("--config.optim.lr=nan", "config.optim.lr"),
        ("--config.optim.lr=-0.1", "config.optim.lr"),
        ("--config.optim.momentum=1.5", "config.optim.momentum"),
        ("--config.optim.weight_decay=nan", "config.optim.weight_decay"),
        ("--config.optim.schedule=linear", "config.optim.schedule"),
        ("--config.optim.peak_fraction=nan", "config.optim.peak_fraction"),
        ("--config.eval.ood_sets=gaussian,gaussian", "duplicate OOD set names"),
        ("--config.model.name=resnet_18", "config.model.name"),
        ("--init_from=/no/such/run", "--init_from '/no/such/run'"),
    ],
)
def test_bad_training_input_is_one_line_before_anything_is_written(
    own, tmp_path, capsys, override, names
):
    root, _ = own
    workdir = tmp_path / "never"
    err = _one_line(
        capsys, _run_main, [f"--workdir={workdir}", f"--data={root}", *RUN_ARGS, override]
    )
    assert err.startswith("error: ") and names in err and "base_lr" not in err, err
    assert not workdir.exists()


def test_workdir_that_is_a_file(own, tmp_path, capsys):
    root, _ = own
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    for main, argv in ((_run_main, RUN_ARGS), (evaluate.main, ())):
        err = _one_line(capsys, main, [f"--workdir={path}", f"--data={root}", *argv])
        assert f"--workdir {str(path)!r} is a file" in err
    assert path.read_text() == "mine"


def test_report_folder_that_is_a_file(run, tmp_path, capsys):
    from ood_jax.evaluate.report import atomic_directory

    path = tmp_path / "notes.txt"
    path.write_text("mine")
    err = _one_line(capsys, evaluate.main, [f"--workdir={run}", f"--out_dir={path}"])
    assert err == f"error: --out_dir {str(path)!r} is a file; give a folder."
    with pytest.raises(ValueError, match="is a file"), atomic_directory(str(path)):
        pass  # the library refuses too, rather than replace the file
    assert path.read_text() == "mine"


@pytest.mark.parametrize(
    ("flag", "least"), [("--batch_size=0", 1), ("--num_draws=0", 1), ("--max_ood=-1", 0)]
)
def test_evaluation_counts_are_checked(run, capsys, flag, least):
    err = _one_line(capsys, evaluate.main, [f"--workdir={run}", flag])
    assert err == f"error: {flag.split('=')[0]} must be >= {least}, got {flag.split('=')[1]}."


def _interrupt_after_loading(monkeypatch):
    """A real SIGINT (Ctrl-C) delivered once the report's OOD sets are loaded."""
    real = experiments.evaluation.load_ood_sets

    def load_then_interrupt(*args, **kwargs):
        sets = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return sets

    monkeypatch.setattr(experiments.evaluation, "load_ood_sets", load_then_interrupt)
    # A process started in the background (`cmd &` without job control) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt: install Python's own
    # handler, the one a foreground run has anyway.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def test_ctrl_c_during_the_evaluation_command(run, own, monkeypatch, capsys):
    root, _ = own
    before = (run / "eval" / "results.json").read_bytes()
    _interrupt_after_loading(monkeypatch)
    err = _one_line(capsys, evaluate.main, [f"--workdir={run}", f"--data={root}"], code=130)
    assert err.startswith("interrupted (Ctrl-C)") and "run the same command again" in err
    assert (run / "eval" / "results.json").read_bytes() == before  # the old report is kept
    assert not [p for p in os.listdir(run) if p.startswith(".eval.")]  # no partial report


def test_ctrl_c_during_the_end_of_training_report(run, own, monkeypatch, capsys, tmp_path):
    root, _ = own
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / "eval" / "results.json").read_bytes()
    _interrupt_after_loading(monkeypatch)
    argv = [f"--workdir={copy}", f"--data={root}", *RUN_ARGS, "--config.eval.ood_sets=gaussian"]
    err = _one_line(capsys, _run_main, argv, code=130)
    assert err.startswith("interrupted (Ctrl-C)")
    assert (copy / "eval" / "results.json").read_bytes() == before
    assert sorted(os.listdir(copy / "checkpoints")) == sorted(os.listdir(run / "checkpoints"))


def test_rerun_of_a_finished_run_skips_its_report(run, own, tmp_path, capsys):
    root, _ = own
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    sets = f"npz:{root / 'rgb.npz'},{root / 'gray.npz'},folder:{root / 'set'}"
    argv = [f"--workdir={copy}", f"--data={root}", *RUN_ARGS, f"--config.eval.ood_sets={sets}"]
    before = (copy / "eval" / "results.json").read_bytes()
    summary = _run_main(argv)
    assert "with these settings is already in" in capsys.readouterr().out
    assert (copy / "eval" / "results.json").read_bytes() == before
    assert summary["ood_report"] == str(copy / "eval")
    # Other settings, or --config.eval.force=true, redo it.
    _run_main([*argv, "--config.eval.force=true"])
    assert "already in" not in capsys.readouterr().out
    assert json.loads((copy / "eval" / "results.json").read_text())["complete"]


def test_eval_folder_has_the_workdirs_mode(run):
    umask = os.umask(0)
    os.umask(umask)
    assert (run / "eval").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (run / "eval").stat().st_mode & 0o777 == (run / "checkpoints").stat().st_mode & 0o777


def test_newest_checkpoint_pruned_while_read(run, tmp_path, monkeypatch):
    """A run still training prunes the newest checkpoint evaluate chose: the next is read."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    real = Checkpointer.read_metadata
    pruned = []

    def prune_then_read(self, step=None):
        if not pruned:
            pruned.append(step)
            shutil.rmtree(os.path.join(self.directory, str(step)))
        return real(self, step)

    monkeypatch.setattr(Checkpointer, "read_metadata", prune_then_read)
    _, _, step = evaluate.restore_model(str(copy))
    assert pruned == [4] and step == 2


@pytest.fixture
def published(run, tmp_path, monkeypatch):
    """The run's model exported as a published checkpoint under a private root."""
    from ood_jax.train.state import split_model

    model, metadata, step = evaluate.restore_model(str(run))
    _, params, batch_stats = split_model(model)
    entry = {"model": metadata["model"], "step": step, "config": metadata["config"]}
    pretrained.export(tmp_path, "own/tiny", params=params, batch_stats=batch_stats, entry=entry)
    monkeypatch.setenv(pretrained.ENV, str(tmp_path))
    return tmp_path


def test_published_report_says_where_it_came_from(published, own, tmp_path):
    root, _ = own
    out = tmp_path / "report"
    argv = ["--pretrained=own/tiny", f"--data={root}", "--ood_sets=gaussian", f"--out_dir={out}"]
    evaluate.main(argv)
    text = (out / "results.md").read_text()
    assert "- checkpoint: published `own/tiny` (sha256 " in text and "None" not in text


@pytest.mark.parametrize("damage", ["not json", "lacks sha256"])
def test_broken_manifest_is_one_line(published, capsys, damage):
    manifest = published / pretrained.MANIFEST
    if damage == "not json":
        manifest.write_text(manifest.read_text()[:-20])
    else:
        entries = json.loads(manifest.read_text())
        del entries["own/tiny"]["sha256"]
        manifest.write_text(json.dumps(entries))
    err = _one_line(capsys, evaluate.main, ["--pretrained=own/tiny"])
    assert str(manifest) in err or pretrained.MANIFEST in err
    assert ("not valid JSON" if damage == "not json" else "lacks ['sha256']") in err


@pytest.mark.parametrize("method", ["logitnorm", "ce", "oe", "energy_ft", "acet", "ceda", "l2norm"])
def test_help_of_each_method_entry_point(method, capsys):
    import importlib

    with pytest.raises(SystemExit) as stop:
        train.main(["--help"], method=method)
    assert stop.value.code == 0
    text = capsys.readouterr().out
    doc = importlib.import_module(f"experiments.cifar10_{method}").__doc__
    assert doc.splitlines()[0] in text
    assert "--config.optim.lr=0.05" in text and "--config.eval.ood_sets=" in text
    assert "presets: paper, cpu, smoke" in text
    assert text.startswith(f"usage: python -m experiments.cifar10_{method} ")


def test_tfds_ood_set_from_the_evaluation_command(run, own, tmp_path, monkeypatch):
    """``tfds:<name>`` through the command line, with tfds's mocked data (no download)."""
    import socket

    import tensorflow_datasets as tfds

    from ood_jax.data import sources

    root, _ = own
    listening = socket.socket()  # the network answers: the probe before a download passes
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    monkeypatch.setattr(sources, "NETWORK_PROBE", listening.getsockname())
    out = tmp_path / "report"
    with tfds.testing.mock_data(num_examples=5):
        results = evaluate.main(
            [
                f"--workdir={run}",
                f"--data={root}",
                "--ood_sets=tfds:svhn_cropped",
                f"--out_dir={out}",
            ]
        )
        reference = np.stack(
            [ex["image"] for ex in tfds.as_numpy(tfds.load("svhn_cropped", split="test"))]
        )
    listening.close()
    assert results["data"]["ood"]["tfds:svhn_cropped"]["num_examples"] == 5
    np.testing.assert_allclose(
        _ood_scores(out, "tfds:svhn_cropped"), _msp(run, reference), rtol=1e-4, atol=1e-5
    )


def test_data_tfds_without_network_is_one_line_in_seconds(tmp_path, monkeypatch, capsys):
    """Real tfds builders, unprepared, and a probe to a port where nothing listens."""
    import socket
    import time

    from ood_jax.data import sources

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    monkeypatch.setattr(sources, "NETWORK_PROBE", closed.getsockname())
    closed.close()
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    from tensorflow_datasets.core import constants

    monkeypatch.setattr(constants, "DATA_DIR", str(tmp_path / "tfds"))  # nothing prepared
    workdir = tmp_path / "never"
    start = time.monotonic()
    err = _one_line(capsys, _run_main, [f"--workdir={workdir}", "--data=tfds", *RUN_ARGS])
    assert time.monotonic() - start < 60
    assert "no network" in err and "--data local" in err
    assert not workdir.exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--temperatures=0", "--temperatures '0': each must be a positive number"),
        ("--temperatures=1,-2", "each must be a positive number"),
        ("--temperatures=hot", "--temperatures 'hot': give numbers"),
        ("--ood_sets=", "--ood_sets '' names nothing; leave the flag out"),
        ("--scores= , ", "--scores ' , ' names nothing"),
    ],
)
def test_evaluation_flags_that_mean_nothing_are_one_line(run, capsys, flag, message):
    err = _one_line(capsys, evaluate.main, [f"--workdir={run}", flag])
    assert err.startswith("error: ") and message in err, err


def test_one_temperature_and_a_zero_budget_say_what_they_mean(run, own, tmp_path, capsys):
    root, _ = own
    out = tmp_path / "report"
    argv = [f"--workdir={run}", f"--data={root}", "--temperatures=2", "--max_train=0"]
    results = evaluate.main([*argv, "--ood_sets=gaussian", f"--out_dir={out}"])
    assert "--max_train 0: no budget, fitting the scores on every training image." in (
        capsys.readouterr().out
    )
    assert list(results["score_hparams"]["msp"]["temperature"]) == [2.0]
    assert results["spec"]["max_train"] is None
    # The MSP at T=2 from the logits, by NumPy, is what the report scored.
    model, _, _ = evaluate.restore_model(str(run))
    from ood_jax.data import CIFAR10_MEAN, CIFAR10_STD

    with np.load(root / "cifar10_test.npz") as f:
        images = f["images"]
    x = (images.astype(np.float32) / 255.0 - np.asarray(CIFAR10_MEAN)) / np.asarray(CIFAR10_STD)
    logits = np.asarray(model(x.astype(np.float32))[0], np.float64) / 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    with np.load(out / "scores.npz") as saved:
        msp = saved["id/msp_T2"]  # the registered default is T=1: the key names T
    np.testing.assert_allclose(msp, (p / p.sum(-1, keepdims=True)).max(-1), rtol=1e-5)


def test_a_damaged_config_json_is_rewritten_with_a_warning(run, own, tmp_path, capsys):
    root, _ = own
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "config.json").write_text('{"seed": ')
    sets = f"npz:{root / 'rgb.npz'},{root / 'gray.npz'},folder:{root / 'set'}"
    argv = [f"--workdir={copy}", f"--data={root}", *RUN_ARGS, f"--config.eval.ood_sets={sets}"]
    with pytest.warns(
        UserWarning, match=r"config.json was damaged \(not readable JSON\); rewritten"
    ):
        _run_main(argv)
    saved = json.loads((copy / "config.json").read_text())
    assert saved["train"]["epochs"] == 1 and saved["seed"] == 0
