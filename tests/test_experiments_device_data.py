"""The runner with ``--config.data.on_device=true``: the objectives with extra inputs.

Outlier exposure reads an auxiliary outlier batch (placed on the device beside the
split); CEDA makes its noise inside the step. With the data on the device a run
trains on the host pipeline's batches, so its losses are the host run's, bit for bit.
"""

import numpy as np
import pytest
from test_experiments import parse, write_easy_cifar

from experiments.train import train_and_evaluate
from ood_jax.checkpoint import Checkpointer
from ood_jax.train.logging import read_metrics

pytestmark = pytest.mark.slow


def _run(tmp_path, name, *overrides):
    config = parse(
        [
            f"--config.data.source={tmp_path}",
            "--config.data.train_limit=256",
            "--config.data.test_limit=64",
            "--config.train.batch_size=32",
            "--config.train.num_steps=6",
            "--config.train.progress=false",
            "--config.train.tensorboard=false",
            *overrides,
        ]
    )
    final = train_and_evaluate(config, tmp_path / name)
    return final, read_metrics(tmp_path / name)


def test_outlier_exposure_with_the_data_on_the_device_is_the_host_run(tmp_path):
    write_easy_cifar(tmp_path, sizes=(300, 64))
    outliers = tmp_path / "outliers.npz"
    noise = np.random.default_rng(1).integers(0, 256, (200, 32, 32, 3)).astype(np.uint8)
    np.savez(outliers, images=noise, labels=np.full(200, -1, np.int32))
    args = [
        "--config.objective.name=outlier_exposure",
        f"--config.data.outliers.source={outliers}",
    ]
    host, host_records = _run(tmp_path, "host", *args)
    device, device_records = _run(tmp_path, "device", *args, "--config.data.on_device=true")
    for key in ("train_loss", "train_outlier_term", "logit_norm"):
        assert [r[key] for r in device_records] == [r[key] for r in host_records], key
    assert device["test_accuracy"] == host["test_accuracy"]
    assert device["test_loss"] == host["test_loss"]
    # The checkpoint records both plans' positions, as the host iterators' (resumable
    # by either path).
    ckpt = Checkpointer(str(tmp_path / "device" / "checkpoints"))
    meta = ckpt.read_metadata()
    ckpt.close()
    assert meta["data"]["step"] == meta["aux_data"]["step"] == 6
    assert meta["aux_data"]["batch_size"] == 64


def test_ceda_makes_its_noise_in_a_step_whose_data_is_on_the_device(tmp_path):
    write_easy_cifar(tmp_path, sizes=(300, 64))
    final, records = _run(
        tmp_path, "ceda", "--config.objective.name=ceda", "--config.data.on_device=true"
    )
    assert final["step"] == 6 and np.isfinite(records[-1]["train_loss"])
