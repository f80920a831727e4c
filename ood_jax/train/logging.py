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
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends per-epoch records to ``<workdir>/metrics.jsonl`` (process 0 only)."""

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int = 0):
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self.enabled = jax.process_index() == 0
        if self.enabled:
            os.makedirs(os.fspath(workdir), exist_ok=True)
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
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

    def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record``; returns it as written (non-finite floats become null, as
        JSON has no NaN)."""
        clean = {k: _json_value(v) for k, v in record.items()}
        if self.enabled:
            with _naming(self.path), open(self.path, "a") as f:
                f.write(json.dumps(clean) + "\n")
                f.flush()
        return clean


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
