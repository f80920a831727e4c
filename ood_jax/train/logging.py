"""Training logs: ``metrics.jsonl`` in the workdir and a tqdm progress bar.

``metrics.jsonl`` holds one JSON object per line, one per epoch (and one for a
final partial epoch): ``step``, ``epoch``, ``train_loss``, ``train_accuracy``,
``logit_norm`` (mean L2 norm of the training logits, the quantity LogitNorm
controls), ``lr``, ``test_accuracy``, ``test_loss``, ``test_logit_norm`` (when a
test set is given), ``images_per_s`` and ``time`` (seconds since the run
started, or resumed), the objective's own terms as ``train_<name>``, and
``partial: true`` with ``steps_averaged`` for an epoch that a resume entered in
the middle (its means cover only the steps after the resume). Only process 0
writes. On resume, records after the restored step are dropped so the file
describes exactly one run.

With ``tensorboard=True``, :class:`MetricsLog` mirrors every record as TensorBoard
scalars in ``<workdir>/tensorboard/train`` (:class:`TensorBoardLog`, written with
tensorboardX: no TensorFlow at run time). The event files are rebuilt from the kept
records at every start, so a resumed run shows each step once.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
# TensorBoard's folder in a workdir: train/ (the metrics.jsonl records) and eval/
# (the OOD report's AUROC and FPR95), two runs of ``tensorboard --logdir``.
TENSORBOARD_DIR = "tensorboard"
# Record fields that are not curves.
_NOT_SCALARS = ("step", "epoch", "time", "partial", "steps_averaged")


class MetricsLog:
    """Appends per-epoch records to ``<workdir>/metrics.jsonl`` (process 0 only), and
    with ``tensorboard`` mirrors them as TensorBoard scalars (:class:`TensorBoardLog`)."""

    def __init__(
        self, workdir: str | os.PathLike, *, resume_step: int = 0, tensorboard: bool = False
    ):
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self.enabled = jax.process_index() == 0
        self.tensorboard: TensorBoardLog | None = None
        if self.enabled:
            os.makedirs(os.fspath(workdir), exist_ok=True)
            kept = self._truncate_after(resume_step)
            if tensorboard:
                logdir = os.path.join(os.fspath(workdir), TENSORBOARD_DIR, "train")
                self.tensorboard = TensorBoardLog(logdir, kept)

    def _truncate_after(self, step: int) -> list[dict[str, Any]]:
        """Drops the records after ``step``; returns those kept."""
        if not os.path.exists(self.path):
            return []
        records, torn = read_records(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        if torn or len(kept) != len(records):
            # Written aside and renamed: a full disk leaves the old file whole.
            tmp = f"{self.path}.tmp-{os.getpid()}"
            with _naming(self.path):
                try:
                    with open(tmp, "w") as f:
                        f.writelines(json.dumps(r) + "\n" for r in kept)
                    os.replace(tmp, self.path)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
        return kept

    def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record``; returns it as written (non-finite floats become null, as
        JSON has no NaN)."""
        clean = {k: _json_value(v) for k, v in record.items()}
        if self.enabled:
            with _naming(self.path), open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
                f.flush()
            if self.tensorboard is not None:
                self.tensorboard.write(clean)
        return clean

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def record_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """``{tag: value}`` of a ``metrics.jsonl`` record: ``train_loss`` -> ``train/loss``,
    ``test_accuracy`` -> ``test/accuracy``, ``logit_norm`` and ``lr`` under ``train/``,
    ``images_per_s`` under ``perf/``; missing (null) values left out."""
    out = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key.startswith(("train_", "test_")):
            tag = key.replace("_", "/", 1)
        elif key == "images_per_s":
            tag = "perf/images_per_s"
        else:
            tag = f"train/{key}"
        out[tag] = float(value)
    return out


class TensorBoardLog:
    """TensorBoard event files of scalars, written with tensorboardX.

    ``logdir`` is emptied and rewritten from ``records`` (``{"step", ...}`` dicts,
    :func:`record_scalars`) when it opens, so its events never hold a step twice:
    a resumed run rebuilds them from its kept ``metrics.jsonl`` records.
    """

    def __init__(self, logdir: str | os.PathLike, records=()):
        from tensorboardX import SummaryWriter

        shutil.rmtree(logdir, ignore_errors=True)
        os.makedirs(logdir, exist_ok=True)
        self._writer = SummaryWriter(os.fspath(logdir))
        for record in records:
            self.write(record, flush=False)
        self._writer.flush()

    def write(self, record: Mapping[str, Any], *, flush: bool = True) -> None:
        """Adds the record's scalars at its ``step``."""
        for tag, value in record_scalars(record).items():
            self._writer.add_scalar(tag, value, int(record["step"]))
        if flush:
            self._writer.flush()

    def add(self, scalars: Mapping[str, float], step: int) -> None:
        """Adds ``{tag: value}`` at ``step``."""
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """OSErrors (a full disk) name the file being written."""
    try:
        yield
    except OSError as err:
        if not err.filename:
            err.filename = path
        raise


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of ``<workdir>/metrics.jsonl``, in order (a torn last line skipped)."""
    return read_records(os.path.join(os.fspath(workdir), METRICS_FILE))[0]


def read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """``(records, torn)`` of a JSON-lines file.

    A crash or a full disk in the middle of a write leaves a torn last line: it is
    skipped with a warning naming the file and line (the next resume rewrites the
    file without it). An unreadable line before the last is corruption: ValueError.
    """
    with open(path) as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    records: list[dict[str, Any]] = []
    for i, (line_no, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i + 1 < len(lines):
                raise ValueError(
                    f"{path}:{line_no}: not a JSON record ({err}); the log is corrupt before "
                    "its last line: fix or delete that line."
                ) from None
            warnings.warn(
                f"{path}:{line_no}: torn last line (a write was interrupted); skipping it.",
                stacklevel=2,
            )
            return records, True
    return records, False


def _json_value(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Progress:
    """A tqdm bar over training steps showing loss, accuracy, images/s and the ETA.

    Images/s is measured over the last log interval (host wall clock between two
    synchronizations), so it excludes compilation once the first interval is done.
    """

    def __init__(self, *, total: int, initial: int, batch_size: int, enabled: bool = True):
        self.batch_size = batch_size
        self._bar = tqdm(
            total=total,
            initial=initial,
            unit="step",
            dynamic_ncols=True,
            disable=not enabled or jax.process_index() != 0,
        )
        self._last_time = time.perf_counter()
        self._last_step = initial
        self.images_per_s = float("nan")

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Advance the bar to ``step`` and show the latest interval's metrics."""
        now = time.perf_counter()
        if step > self._last_step:
            self.images_per_s = (step - self._last_step) * self.batch_size / (now - self._last_time)
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            acc=f"{metrics['accuracy']:.3f}",
            img_s=f"{self.images_per_s:.0f}",
            refresh=False,
        )
        self._last_time, self._last_step = now, step

    def write(self, message: str) -> None:
        """Print a line above the bar."""
        if jax.process_index() == 0:
            self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
