"""Two processes on localhost (jax.distributed, gloo CPU collectives) train like one.

Each process has 2 virtual CPU devices and feeds its half of every global batch;
the result must match a single process driving 4 devices (same global batches,
same mesh size), and the checkpoint they write together must restore onto one
device in this process. With the data on the device, each process places only its
devices' rows of the split, and the run matches the single process all the same.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from multiprocess_worker import run_training

from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer, abstract_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multiprocess_worker.py")
NUM_STEPS = 6

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("on_device", [False, True], ids=["host", "on_device"])
def test_two_processes_match_one_process(tmp_path, on_device):
    port = free_port()
    workdir = tmp_path / "multi"
    out = tmp_path / "result.npz"
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                WORKER,
                "--workdir",
                str(workdir),
                "--num_steps",
                str(NUM_STEPS),
                "--devices",
                "2",
                "--num_processes",
                "2",
                "--process_id",
                str(i),
                "--port",
                str(port),
                "--out",
                str(out),
                *(["--on_device"] if on_device else []),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0].decode())
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-4000:]

    if on_device:
        # The 256-image split over 4 devices, 64 rows each: every process holds only its
        # own 2 devices' rows (the worker checks their contents against the dataset).
        held = [json.loads(Path(f"{out}.rows{i}.json").read_text()) for i in range(2)]
        assert held == [[[0, 64], [64, 128]], [[128, 192], [192, 256]]]
    single, records = run_training(
        str(tmp_path / "single"),
        num_steps=NUM_STEPS,
        num_devices=4,
        use_checkpoints=False,
        on_device=on_device,
    )
    result = np.load(out)
    np.testing.assert_allclose(result["losses"], [r["train_loss"] for r in records], rtol=1e-5)
    flat = jax.tree_util.tree_flatten_with_path(sharding.fetch(single.params))[0]
    assert len(flat) == len(result.files) - 1
    for path, value in flat:
        np.testing.assert_allclose(result[jax.tree_util.keystr(path)], value, rtol=1e-4, atol=1e-6)

    # The checkpoint written by both processes restores onto a single device.
    ckpt = Checkpointer(workdir / "checkpoints")
    assert ckpt.latest_step() == NUM_STEPS
    target = abstract_like(
        jax.tree.map(np.asarray, single), sharding.replicated(sharding.make_mesh(1))
    )
    restored, metadata = ckpt.restore(target)
    assert metadata["data"]["step"] == NUM_STEPS
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
