"""Exact resumption and atomic checkpoints, with a training process killed by SIGKILL.

Training N steps straight, and training with a stop (or a SIGKILL at an arbitrary
moment, possibly in the middle of writing a checkpoint) followed by a resume to
N, must give bitwise identical parameters on CPU: data order, augmentation,
dropout keys and optimizer state all resume exactly; with the data on the device too
(``config.data.on_device``: the split on the mesh, each batch made in the step), whose
batches are the host pipeline's, so a run trains to the same bits either way.
"""

import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from multiprocess_worker import run_training

from ood_jax.checkpoint import Checkpointer, abstract_like
from ood_jax.train.logging import read_metrics

NUM_STEPS = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    state, _ = run_training(
        str(tmp_path_factory.mktemp("straight")), num_steps=NUM_STEPS, use_checkpoints=False
    )
    return jax.tree.map(np.asarray, state)


@pytest.fixture(scope="module")
def straight_on_device(tmp_path_factory):
    state, _ = run_training(
        str(tmp_path_factory.mktemp("straight_on_device")),
        num_steps=NUM_STEPS,
        use_checkpoints=False,
        on_device=True,
    )
    return jax.tree.map(np.asarray, state)


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stop_and_resume_is_bitwise_exact(tmp_path, straight):
    # Stop at step 5 (a mid-epoch step: 8 steps per epoch), resume to 10.
    first, _ = run_training(str(tmp_path), num_steps=5, checkpoint_every=5)
    assert int(first.step) == 5
    resumed, records = run_training(str(tmp_path), num_steps=NUM_STEPS, checkpoint_every=5)
    assert int(resumed.step) == NUM_STEPS
    assert_bitwise_equal(jax.tree.map(np.asarray, resumed), straight)
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 8, 10]


def test_stop_and_resume_with_data_on_the_device_is_bitwise_exact(tmp_path, straight_on_device):
    first, _ = run_training(str(tmp_path), num_steps=5, checkpoint_every=5, on_device=True)
    assert int(first.step) == 5
    resumed, _ = run_training(
        str(tmp_path), num_steps=NUM_STEPS, checkpoint_every=5, on_device=True
    )
    assert_bitwise_equal(jax.tree.map(np.asarray, resumed), straight_on_device)


def test_data_on_the_device_trains_as_the_host_pipeline_and_a_run_may_switch(
    tmp_path, straight, straight_on_device
):
    # The same batches, bit for bit: the same parameters (8 CPU devices).
    assert_bitwise_equal(straight_on_device, straight)
    # A checkpoint of the host pipeline resumes with the data on the device.
    run_training(str(tmp_path), num_steps=5, checkpoint_every=5)
    resumed, _ = run_training(
        str(tmp_path), num_steps=NUM_STEPS, checkpoint_every=5, on_device=True
    )
    assert_bitwise_equal(jax.tree.map(np.asarray, resumed), straight)


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "on_device"])
def test_sigkill_at_any_moment_leaves_a_restorable_checkpoint(tmp_path, request, on_device):
    straight = request.getfixturevalue("straight_on_device" if on_device else "straight")
    ckpt_dir = tmp_path / "checkpoints"
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [
            sys.executable,
            WORKER,
            "--workdir",
            str(tmp_path),
            "--num_steps",
            "1000",  # never finishes: it is killed first
            "--checkpoint_every",
            "1",
            "--step_sleep",
            "0.2",
            *(["--on_device"] if on_device else []),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while not (ckpt_dir.is_dir() and any(n.isdigit() for n in os.listdir(ckpt_dir))):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "worker wrote no checkpoint in time"
            time.sleep(0.05)
        # Saves happen every step, so a random moment often falls inside one. With
        # >= 0.2 s per step the worker is killed before step NUM_STEPS.
        time.sleep(random.uniform(0.0, 1.0))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    ckpt = Checkpointer(ckpt_dir)
    latest = ckpt.latest_step()
    assert latest is not None and 1 <= latest < NUM_STEPS
    restored, metadata = ckpt.restore(abstract_like(straight))
    assert int(restored.step) == latest
    assert metadata["data"]["step"] == latest
    resumed, _ = run_training(
        str(tmp_path), num_steps=NUM_STEPS, checkpoint_every=1, on_device=on_device
    )
    assert_bitwise_equal(jax.tree.map(np.asarray, resumed), straight)


def test_resume_after_a_corrupt_newest_checkpoint_is_bitwise_exact(tmp_path, straight):
    # Checkpoints at 2, 4, 6; the newest is truncated (a crash of the disk, a bad copy).
    run_training(str(tmp_path), num_steps=6, checkpoint_every=2)
    step_dir = tmp_path / "checkpoints" / "6"
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            if os.path.basename(root) == "d":
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(10)
    with pytest.warns(UserWarning, match=r"skipping corrupt checkpoint step 6: .* truncated"):
        resumed, _ = run_training(str(tmp_path), num_steps=NUM_STEPS, checkpoint_every=2)
    assert_bitwise_equal(jax.tree.map(np.asarray, resumed), straight)
    assert os.listdir(tmp_path / "checkpoints.corrupt") == ["6"]
    assert [r["step"] for r in read_metrics(tmp_path)] == [8, 10]
