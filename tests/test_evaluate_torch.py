"""PyTorch checkpoints through the command line: ``experiments.evaluate --torch_checkpoint``
and ``--init_from FILE.pt`` in training, on the committed fixtures (tests/fixtures/torch/,
reduced-width copies of the architectures, see tests/test_interop.py)."""

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from test_evaluate_cli import user_error

import experiments.train
from experiments import evaluate as cli
from experiments.train import main as train_main
from ood_jax import data as D
from ood_jax import interop
from ood_jax.evaluate import ForwardPass, load_ood_sets
from ood_jax.train import split_model

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "torch"
# A tiny budget: 200 CIFAR-10 test images of the offline files, one synthetic set.
BUDGET = [
    "--eval_preset=cpu",
    "--data=local",
    "--ood_sets=gaussian",
    "--scores=msp,energy",
    "--max_train=200",
    "--num_synthetic=200",
    "--num_draws=2",
    "--config.data.test_limit=200",
    "--config.data.train_limit=200",
    "--config.eval.adversarial_noise=0",
]
SMALL_RESNET = "--config.model.options.widths=(2,4,8,16)"


def _auroc(id_scores, ood_scores):
    """P(id score > ood score) + half the ties (Mann-Whitney), by brute force."""
    diff = np.asarray(id_scores, np.float64)[:, None] - np.asarray(ood_scores, np.float64)[None]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def test_a_pytorch_file_gets_the_full_report(tmp_path):
    path = FIXTURES / "resnet18_32x32.pt"
    out = tmp_path / "eval"
    cli.main(
        [f"--torch_checkpoint={path}", "--arch=resnet18_32x32", *BUDGET, SMALL_RESNET]
        + [f"--out_dir={out}"]
    )
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] and (out / "results.md").exists()
    openood = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # the architecture's own
    assert report["checkpoint"] == {
        "torch_checkpoint": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "format": "zip",
        "arch": "resnet18_32x32",
        "source": "Jingkang50/OpenOOD openood/networks/resnet18_32x32.py ResNet18_32x32",
        "normalization": "openood_cifar10",
        "num_classes": 10,
        "mean": list(openood[0]),
        "std": list(openood[1]),
    }
    assert (tuple(report["spec"]["mean"]), tuple(report["spec"]["std"])) == openood
    assert report["model"] == {"name": "resnet18", "options": {"widths": [2, 4, 8, 16]}}

    # The same 200 images through the directly loaded model; numbers with NumPy.
    model, _ = interop.load_torch(path, "resnet18_32x32", options={"widths": (2, 4, 8, 16)})
    test = D.random_subset(D.load_dataset("cifar10_jpeg", "test"), 200, seed=0)
    (gaussian,) = load_ood_sets(["gaussian"], num_synthetic=200, seed=0, id_test=test).values()
    forward = ForwardPass(model)
    test_logits, ood_logits = (
        np.asarray(
            forward(D.eval_batches(ds, batch_size=100, mean=openood[0], std=openood[1])).logits,
            np.float64,
        )
        for ds in (test, gaussian)
    )
    accuracy = float((test_logits.argmax(-1) == test.labels).mean())
    assert report["classification"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert report["mmc"]["gaussian"] == pytest.approx(_softmax(ood_logits).max(-1).mean(), 1e-5)
    msp_in, msp_out = _softmax(test_logits).max(-1), _softmax(ood_logits).max(-1)
    full = report["ood"]["full"]["metrics"]
    assert full["msp"]["gaussian"]["auroc"]["mean"] == pytest.approx(_auroc(msp_in, msp_out), 1e-4)
    # The library's float32 energies can order a few near-tied pairs (of 40,000) otherwise.
    energy = [np.log(np.exp(x).sum(-1)) for x in (test_logits, ood_logits)]
    assert full["energy"]["gaussian"]["auroc"]["mean"] == pytest.approx(_auroc(*energy), abs=2e-4)


def test_safetensors_with_its_own_normalization_and_the_default_folder(tmp_path, monkeypatch):
    path = FIXTURES / "wrn40_2.safetensors"
    monkeypatch.chdir(tmp_path)
    results = cli.main(
        [f"--torch_checkpoint={path}", "--arch=wrn40_2", "--normalization=0.5,0.25", *BUDGET]
        + ["--config.model.options.base_width=2"]
    )
    report_dir = Path("runs", "torch", "wrn40_2", "eval")
    assert Path(results["report_dir"]).resolve() == report_dir.resolve()
    report = json.loads((report_dir / "results.json").read_text())
    assert report["checkpoint"]["format"] == "safetensors"
    assert report["checkpoint"]["normalization"] == "0.5,0.25"
    assert report["spec"]["mean"] == [0.5] * 3 and report["spec"]["std"] == [0.25] * 3
    assert report["model"] == {"name": "wrn40_2", "options": {"base_width": 2}}


def test_the_smoke_evaluation_preset_needs_no_training_method(tmp_path):
    """``--eval_preset smoke``: its data (a 512-image subset of the offline CIFAR-10 test
    set), sets and budgets, and a config with no training fields."""
    out = tmp_path / "eval"
    cli.main(
        [f"--torch_checkpoint={FIXTURES / 'wrn40_2.pt'}", "--arch=wrn40_2", "--eval_preset=smoke"]
        + ["--config.model.options.base_width=2", "--scores=msp,energy,knn", f"--out_dir={out}"]
    )
    report = json.loads((out / "results.json").read_text())
    assert report["complete"] and report["config"]["eval_preset"] == "smoke"
    assert not {"method", "preset", "objective", "optim"} & set(report["config"])
    assert report["data"]["id"]["num_examples"] == 512
    assert set(report["ood"]["full"]["metrics"]["knn"]) == {
        "gaussian",
        "uniform",
        "adversarial_noise",
        "average",
    }
    assert report["data"]["ood"]["adversarial_noise"]["num_examples"] == 64
    assert report["spec"]["max_train"] == 512 and report["spec"]["attack_steps"] == 5


def test_bad_combinations_and_bad_files_are_one_line_errors(tmp_path, capsys):
    wrn = f"--torch_checkpoint={FIXTURES / 'wrn40_2.pt'}"
    out = f"--out_dir={tmp_path / 'eval'}"
    assert "needs --arch (one of wrn40_2" in user_error(capsys, [wrn, out])
    assert "--arch, --normalization: only with --torch_checkpoint" in user_error(
        capsys, [f"--workdir={tmp_path}", "--arch=wrn40_2", "--normalization=imagenet"]
    )
    assert "--step applies to a --workdir" in user_error(
        capsys, [wrn, "--arch=wrn40_2", "--step=3"]
    )
    assert "--arch 'wrn28_10': known:" in user_error(capsys, [wrn, "--arch=wrn28_10", *BUDGET])
    assert "no PyTorch checkpoint at" in user_error(
        capsys, [f"--torch_checkpoint={tmp_path / 'absent.pt'}", "--arch=wrn40_2", *BUDGET]
    )
    err = user_error(capsys, [wrn, "--arch=resnet18_cifar", *BUDGET, SMALL_RESNET, out])
    assert "as --arch resnet18_cifar: missing key" in err
    err = user_error(capsys, [wrn, "--arch=wrn40_2", "--normalization=0.5,-1", *BUDGET, out])
    assert "standard deviations must be > 0" in err
    err = user_error(
        capsys,
        [wrn, "--arch=wrn40_2", "--dataset=cifar100", *BUDGET, out]
        + ["--config.model.options.base_width=2"],
    )
    assert "the model has 10 classes, 'cifar100' has 100" in err
    # A pickle that would run code when unpickled: refused, and nothing ran.
    marker = tmp_path / "ran"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (tmp_path / "evil.pt").write_bytes(payload)
    err = user_error(capsys, [f"--torch_checkpoint={tmp_path / 'evil.pt'}", "--arch=wrn40_2", out])
    assert "evil.pt: the checkpoint asks for os.system" in err and not marker.exists()
    assert not (tmp_path / "eval").exists()
    err = user_error(capsys, [wrn, "--arch=wrn40_2", f"--workdir={tmp_path}"])
    assert "exactly one of --workdir, --pretrained, --torch_checkpoint; got --workdir and" in err
    assert "got none" in user_error(capsys, ["--arch=wrn40_2"])
    assert "--eval_preset 'tpu': unknown evaluation preset; known: paper|cpu|smoke" in user_error(
        capsys, [wrn, "--arch=wrn40_2", "--eval_preset=tpu"]
    )
    assert "chosen with --eval_preset" in user_error(
        capsys, [wrn, "--arch=wrn40_2", "--preset=cpu"]
    )


def test_fine_tuning_starts_from_the_pytorch_weights(tmp_path, monkeypatch):
    """``--init_from FILE.pt`` with the OE entry point: the first step's state is the file's."""
    path = FIXTURES / "wrn40_2.pt"
    started = {}

    def recording_fit(state, **kwargs):
        started["params"], started["batch_stats"] = state.params, state.batch_stats
        started["step"] = int(state.step)
        return fit(state, **kwargs)

    fit = experiments.train.fit
    monkeypatch.setattr(experiments.train, "fit", recording_fit)
    summary = train_main(
        [
            f"--workdir={tmp_path / 'oe'}",
            "--preset=smoke",
            f"--init_from={path}",
            "--config.model.name=wrn40_2",
            "--config.model.options={'base_width': 2}",
            "--config.train.num_steps=2",
            "--config.train.batch_size=16",
            "--config.data.train_limit=64",
            "--config.data.test_limit=32",
            "--config.train.progress=false",
        ],
        method="oe",
    )
    assert summary["step"] == 2 and started["step"] == 0
    model, _ = interop.load_torch(path, "wrn40_2", options={"base_width": 2})
    _, params, batch_stats = split_model(model)
    leaves = jax.tree_util.tree_leaves_with_path
    for expected, actual in ((params, started["params"]), (batch_stats, started["batch_stats"])):
        flat_expected, flat_actual = (
            {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves(tree)}
            for tree in (expected, actual)
        )
        assert flat_expected.keys() == flat_actual.keys()
        for key, value in flat_expected.items():
            np.testing.assert_array_equal(flat_actual[key], value, err_msg=key)
    # And against the file itself: the head transposed, the stem OIHW -> HWIO.
    state_dict, _ = interop.read_state_dict(path)
    head = started["params"]["head"]
    np.testing.assert_array_equal(np.asarray(head["kernel"][...]), state_dict["fc.weight"].T)
    stem = np.asarray(started["params"]["conv1"]["kernel"][...])
    np.testing.assert_array_equal(stem, state_dict["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        np.asarray(started["batch_stats"]["bn"]["var"][...]), state_dict["bn1.running_var"]
    )
