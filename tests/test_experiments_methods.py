"""The methods' entry points: presets, --init_from, automatic energy margins, end to end."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from test_experiments import ROOT, write_easy_cifar

from experiments import cli, methods
from experiments.evaluate import restore_model
from experiments.train import SCHEMA_FIELDS, complete_config, train_and_evaluate
from experiments.train import main as train_main
from ood_jax import data as D
from ood_jax.train.logging import read_metrics


def config_of(method, preset="smoke", finetune=False, overrides=()):
    return cli.apply_overrides(
        methods.get_config(method, preset, finetune=finetune),
        list(overrides),
        first=SCHEMA_FIELDS,
        prepare=complete_config,
    )


def test_presets_record_each_papers_recipe():
    oe = config_of("oe", "paper")
    assert oe.objective.name == "outlier_exposure" and oe.objective.hparams.weight == 0.5
    assert (oe.train.batch_size, oe.data.outliers.ratio, oe.train.epochs) == (128, 2, 200)
    ft = config_of("oe", "paper", finetune=True)
    assert (ft.train.epochs, ft.optim.lr, ft.optim.schedule, ft.optim.final_lr) == (
        10,
        1e-3,
        "cosine",
        1e-6,
    )
    energy = config_of("energy_ft", "paper")
    assert energy.objective.hparams.to_dict() == {"weight": 0.1, "m_in": -23.0, "m_out": -5.0}
    assert (energy.train.epochs, energy.optim.nesterov) == (10, True)
    acet = config_of("acet", "paper")
    assert acet.model.name == "resnet18" and tuple(acet.optim.boundaries_epochs) == (50, 75, 90)
    assert (acet.objective.hparams.attack_steps, acet.objective.hparams.attack_eps) == (40, 0.3)
    assert config_of("acet", "cpu").objective.hparams.attack_steps == 5  # recorded, shortened
    l2 = config_of("l2norm", "paper")
    assert l2.objective.name == "feature_norm" and l2.train.batch_size == 1024
    assert l2.model.options.to_dict() == {
        "spectral_norm": True,
        "activation": "leaky_relu",
        "pooling": "avg",
    }
    assert (l2.train.epochs, tuple(l2.optim.boundaries_epochs)) == (60, (40, 50))
    plus = config_of("l2norm", "logitnorm_plus")
    assert plus.objective.name == "logitnorm" and plus.model.options.spectral_norm is True
    assert (plus.train.epochs, plus.train.batch_size) == (350, 128)
    # CEDA/ACET make noise in pixel space: the dataset's normalization is filled in.
    assert tuple(config_of("ceda").objective.hparams.std) == pytest.approx(D.CIFAR10_STD)


def test_outlier_runs_label_overlapping_sets_near_auxiliary():
    from experiments.train import near_auxiliary_notes

    sets = ["tinyimagenet_crop", "tinyimagenet_resize", "textures_partial", "gaussian"]
    oe = config_of("oe")
    assert near_auxiliary_notes(oe, sets) == {
        "tinyimagenet_crop": "near-auxiliary",
        "tinyimagenet_resize": "near-auxiliary",
    }
    assert near_auxiliary_notes(config_of("ce"), sets) == {}  # no outliers in training
    other = config_of("oe", overrides=["--config.data.outliers.source=npz:/x/other.npz"])
    assert near_auxiliary_notes(other, sets) == {}


def test_energy_ft_requires_init_from(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([f"--workdir={tmp_path}", "--preset=smoke"], method="energy_ft")
    assert exit_info.value.code == 2
    assert "--init_from" in capsys.readouterr().err


def _energies(workdir, images):
    """Free energies -logsumexp(f) of the workdir's model, computed here with NumPy."""
    model, _, _ = restore_model(str(workdir))
    logits = np.asarray(model(jnp.asarray(images))[0], np.float64)
    top = logits.max(1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(1)))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_easy_cifar(data, sizes=(256, 64))
    noise = np.random.default_rng(1).integers(0, 256, (192, 32, 32, 3)).astype(np.uint8)
    np.savez(data / "outliers.npz", images=noise, labels=np.full(192, -1, np.int32))
    workdir = tmp_path_factory.mktemp("ce")
    c = config_of(
        "ce",
        overrides=[f"--config.data.source={data}", "--config.train.batch_size=32"],
    )
    c.train.progress = False
    train_and_evaluate(c, workdir)
    return data, workdir


@pytest.mark.slow
def test_energy_fine_tuning_auto_margins_and_direction(pretrained, tmp_path):
    data, source = pretrained
    common = [
        f"--config.data.source={data}",
        f"--config.data.outliers.source={data / 'outliers.npz'}",
        "--config.train.batch_size=32",
        "--config.data.augment=false",
        f"--config.train.init_from={source}",
    ]
    train_ds = D.load_dataset("cifar10", "train", local_path=data / "cifar10_train.npz")
    outliers = D.from_npz(data / "outliers.npz")
    e_in = _energies(source, D.normalize(train_ds.images))
    e_out = _energies(source, D.normalize(outliers.images))

    # auto: the margins are the initial model's mean energies, recorded in config.json.
    auto = config_of("energy_ft", overrides=common)
    auto.objective.auto = ("m_in", "m_out")
    auto.train.progress = False
    train_and_evaluate(auto, tmp_path / "auto")
    recorded = json.loads((tmp_path / "auto" / "config.json").read_text())["objective"]
    assert recorded["hparams"]["m_in"] == pytest.approx(e_in.mean(), rel=1e-4)
    assert recorded["hparams"]["m_out"] == pytest.approx(e_out.mean(), rel=1e-4)
    assert recorded["auto"] == ["m_in", "m_out"]

    # Direction: margins both initially violated; the hinge terms shrink on fixed data.
    m_in, m_out = float(e_in.mean()) - 1.0, float(e_out.mean()) + 1.0
    fixed = config_of(
        "energy_ft",
        overrides=[
            *common,
            f"--config.objective.hparams.m_in={m_in}",
            f"--config.objective.hparams.m_out={m_out}",
            "--config.objective.hparams.weight=1.0",
            "--config.optim.lr=0.01",
            "--config.train.epochs=2",
        ],
    )
    fixed.train.progress = False
    train_and_evaluate(fixed, tmp_path / "fixed")
    after_in = _energies(tmp_path / "fixed", D.normalize(train_ds.images))
    after_out = _energies(tmp_path / "fixed", D.normalize(outliers.images))
    hinge = lambda e, m, sign: np.mean(np.maximum(sign * (e - m), 0) ** 2)
    before = hinge(e_in, m_in, 1) + hinge(e_out, m_out, -1)
    after = hinge(after_in, m_in, 1) + hinge(after_out, m_out, -1)
    assert after < 0.7 * before, (before, after)
    # In-distribution energies move down towards m_in, the outliers' up towards m_out.
    assert after_in.mean() < e_in.mean() and after_out.mean() > e_out.mean()


@pytest.mark.slow
def test_init_from_another_model_is_a_clear_error(pretrained, tmp_path, capsys):
    data, source = pretrained
    argv = [
        f"--workdir={tmp_path}",
        "--preset=smoke",
        f"--data={data}",
        f"--init_from={source}",
        "--config.model.options.width=4",
    ]
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv, method="oe")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--init_from" in err and "same model" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, extra",
    [
        ("cifar10_oe", ["--init_from={source}", "--config.data.outliers.source={outliers}"]),
        (
            "cifar10_energy_ft",
            [
                "--init_from={source}",
                "--m_in=auto",
                "--m_out=-3",
                "--config.data.outliers.source={outliers}",
            ],
        ),
        ("cifar10_ceda", []),
        (
            "cifar10_acet",
            [
                "--config.eval.ood=true",
                "--config.eval.adversarial_noise=16",
                "--config.eval.scores=msp",
            ],
        ),
        ("cifar10_l2norm", []),
    ],
)
def test_entry_point_smoke_end_to_end(pretrained, tmp_path, module, extra):
    data, source = pretrained
    args = [a.format(source=source, outliers=data / "outliers.npz") for a in extra]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            f"experiments.{module}",
            f"--workdir={tmp_path / 'run'}",
            "--preset=smoke",
            f"--data={data}",
            "--config.train.batch_size=32",
            "--config.train.progress=false",
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["test_examples"] == 64 and np.isfinite(final["test_loss"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == module.removeprefix("cifar10_")
    records = read_metrics(tmp_path / "run")
    if module == "cifar10_energy_ft":
        assert config["objective"]["hparams"]["m_out"] == -3.0
        assert config["train"]["init_from"] == str(source)
        assert np.isfinite(records[-1]["train_energy_term"])
    if module in ("cifar10_ceda", "cifar10_acet"):
        assert 0.0 < records[-1]["train_noise_mmc"] <= 1.0
    if module == "cifar10_acet":
        results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
        assert results["data"]["ood"]["adversarial_noise"]["num_examples"] == 16
        assert set(results["mmc"]) == {"cifar10", "gaussian", "uniform", "adversarial_noise"}
