"""The training loop: resume, step, log, evaluate, checkpoint, stop on NaN.

:func:`fit` drives a compiled train step (see :mod:`ood_jax.train.step`) over a
resumable data iterator. It is deterministic end to end: batch ``s`` and the
step's random key are pure functions of the seeds and ``s``, so killing the run
and resuming from a checkpoint gives the same parameters as never stopping.

Host synchronization happens only every ``log_every`` steps (and at epoch ends
and checkpoints), where the buffered per-step metrics are fetched at once and
checked for a non-finite loss. A checkpoint is written only right after such a
check, so a NaN state is never saved.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ood_jax import sharding
from ood_jax.checkpoint import Checkpointer, abstract_like
from ood_jax.train.logging import MetricsLog, Progress
from ood_jax.train.state import TrainState

# A data iterator factory: called with a start position (a step, or the dict its
# iterator's get_state() returned) and returning an iterator of host batches.
IteratorFactory = Callable[[Any], Iterator[Mapping[str, np.ndarray]]]


class NonFiniteLossError(FloatingPointError):
    """The training loss (or gradient) became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training at a step boundary, after a checkpoint.

    Attributes:
      signum: the signal (``signal.SIGINT`` or ``signal.SIGTERM``).
      step: the completed step that was saved.
      directory: the checkpoint directory (None when training without checkpoints).
    """

    def __init__(self, signum: int, step: int, directory: str | None) -> None:
        self.signum, self.step, self.directory = signum, step, directory
        name = signal.Signals(signum).name
        where = f"checkpoint step {step} saved in {directory}" if directory else "not saved"
        super().__init__(f"{name} at step {step}: {where}; run the same command to resume.")

    @property
    def exit_code(self) -> int:
        """The shell convention: 128 + signal number (130 for Ctrl-C, 143 for SIGTERM)."""
        return 128 + int(self.signum)


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag that the loop checks at each step boundary.

    What a preempted TPU VM or a cluster scheduler sends is SIGTERM; the step in
    flight finishes, a checkpoint is written, and :class:`TrainingInterrupted` is
    raised. Only in the main thread (where Python delivers signals); the previous
    handlers come back when training ends.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def restore_or_initialize(
    state: TrainState,
    mesh: Mesh,
    checkpointer: Checkpointer | None,
    *,
    expected_model: Mapping[str, Any] | None = None,
) -> tuple[TrainState, dict[str, Any] | None]:
    """Place ``state`` on ``mesh``, or replace it by the newest checkpoint if there is one.

    Returns ``(state, metadata)`` with ``metadata`` None when starting from scratch.
    A corrupt newest checkpoint (unreadable, or arrays that differ from their saved
    hashes) is set aside with a warning naming its step, and the newest intact one
    is restored. A checkpoint of another model, or no intact checkpoint at all,
    raises ``ood_jax.checkpoint.CheckpointError``: never a silent fresh start.
    """
    if checkpointer is None or checkpointer.latest_step() is None:
        return sharding.replicate(state, mesh), None
    target = abstract_like(state, sharding.replicated(mesh))
    return checkpointer.restore_newest_intact(target, expected_model=expected_model)


def evaluate(
    eval_step: Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]],
    state: TrainState,
    batches: Iterable[Mapping[str, np.ndarray]],
    mesh: Mesh,
) -> dict[str, float]:
    """Test accuracy, mean cross-entropy and mean logit norm over padded, masked batches.

    ``eval_step`` returns per-batch sums (``count``, ``correct``, ``loss``,
    ``logit_norm``); they are summed on device and fetched once.
    """
    totals = None
    for batch in batches:
        sums = eval_step(state, sharding.global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
        raise ValueError("eval batches are empty; pass a non-empty test set.")
    totals = {k: float(v) for k, v in sharding.fetch(totals).items()}
    count = max(totals["count"], 1.0)
    return {
        "accuracy": totals["correct"] / count,
        "loss": totals["loss"] / count,
        "logit_norm": totals["logit_norm"] / count,
        "count": int(totals["count"]),
    }


@dataclasses.dataclass(frozen=True)
class TrainData:
    """What :func:`fit` trains on.

    Attributes:
      batches: ``start -> iterator`` of this process's train batches; ``start`` is the
        global step, or the iterator state saved in the checkpoint (``get_state()``).
      steps_per_epoch: steps per epoch (for per-epoch logs and evaluation).
      batch_size: global batch size (for images/s).
      aux_batches: like ``batches``, for the auxiliary outlier batch (``aux_batch``).
    """

    batches: IteratorFactory
    steps_per_epoch: int
    batch_size: int
    aux_batches: IteratorFactory | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointPolicy:
    """When and what :func:`fit` checkpoints (and where it resumes from).

    Attributes:
      checkpointer: the run's checkpointer; :func:`fit` neither creates nor closes it.
      every: steps between saves (0 = only at the end); the last step always saves.
      model_identity: ``{"name", "num_classes", "options"}``; saved as
        ``metadata["model"]`` and checked on restore.
      metadata: extra JSON saved with every checkpoint (e.g. the config).
    """

    checkpointer: Checkpointer
    every: int = 0
    model_identity: Mapping[str, Any] | None = None
    metadata: Mapping[str, Any] | None = None

    def due(self, done: int, num_steps: int, stopping: bool) -> bool:
        """Is step ``done`` saved?"""
        return done == num_steps or bool(self.every and done % self.every == 0) or stopping

    def save(self, done: int, state: TrainState, iterators: Sequence[Any]) -> None:
        """Saves ``state`` with the metadata and the train (and aux) iterators' positions."""
        meta = dict(self.metadata or {})
        meta["model"] = dict(self.model_identity or {})
        for key, iterator in zip(("data", "aux_data"), iterators, strict=True):
            if iterator is not None:
                meta[key] = _iterator_state(iterator, done)
        self.checkpointer.save(done, state, meta)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """The test pass at every epoch end: the compiled eval step and a factory of batches."""

    step: Callable[..., dict[str, jax.Array]]
    batches: Callable[[], Iterable[Mapping[str, np.ndarray]]]


# About 90 lines with its docstring; 13 keyword arguments, each a separate concern of the
# loop (the data, checkpoints and evaluation are already grouped into dataclasses).
def fit(
    state: TrainState,
    *,
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    mesh: Mesh,
    data: TrainData,
    num_steps: int,
    workdir: str | os.PathLike,
    checkpoints: CheckpointPolicy | None = None,
    evaluation: Evaluation | None = None,
    log_every: int = 50,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    tensorboard: bool = False,
    profile_steps: int = 0,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Train ``state`` to ``num_steps`` steps, resuming from the checkpoints if possible.

    Args:
      state: the step-0 state (host arrays); replaced by the newest checkpoint if any.
      train_step: the compiled ``train_step(state, batch, aux_batch=None)``.
      mesh: the device mesh the step was compiled for.
      data: the train (and auxiliary) batches, steps per epoch and global batch size.
      num_steps: total optimizer steps of the run (not of this invocation).
      workdir: where ``metrics.jsonl`` goes.
      checkpoints: saving policy; None disables checkpoints (and resuming).
      evaluation: when given, every epoch end and the last step report the test accuracy.
      log_every: steps between host synchronizations (progress bar, NaN check).
      progress: show the tqdm bar.
      on_step: called with the number of completed steps after each step (after the
        checkpoint of that step, if any); for tests and external monitoring.
      tensorboard: also write the records as TensorBoard scalars
        (``workdir/tensorboard/train``, see :class:`ood_jax.train.logging.MetricsLog`).
      profile_steps: N > 0 captures a ``jax.profiler`` trace of the N steps after this
        invocation's first (compiling) step into ``workdir/profile`` (TensorBoard's
        profile plugin or Perfetto read it); the training itself is unchanged.

    Returns:
      ``(state, records)``: the final state and the records written to ``metrics.jsonl``
      by this invocation.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; names the step. The state of that
        step is not saved, so the newest checkpoint is the last good one.
    """
    every = checkpoints.every if checkpoints is not None else 0
    if num_steps < 0 or data.steps_per_epoch < 1 or log_every < 1 or min(every, profile_steps) < 0:
        raise ValueError(
            "need num_steps >= 0, steps_per_epoch >= 1, log_every >= 1, checkpoint_every >= 0 "
            f"and profile_steps >= 0; got {num_steps}, {data.steps_per_epoch}, {log_every}, "
            f"{every}, {profile_steps}."
        )
    checkpointer = checkpoints.checkpointer if checkpoints is not None else None
    expected = checkpoints.model_identity if checkpoints is not None else None
    state, restored = restore_or_initialize(state, mesh, checkpointer, expected_model=expected)
    first = int(sharding.fetch(state.step))
    train_iter = data.batches(restored["data"] if restored else first)
    aux_iter = None
    if data.aux_batches is not None:
        aux_iter = data.aux_batches(restored.get("aux_data", first) if restored else first)
    bar = Progress(total=num_steps, initial=first, batch_size=data.batch_size, enabled=progress)
    if restored:
        bar.write(f"resumed from checkpoint step {first} in {checkpointer.directory}")
    log = MetricsLog(workdir, resume_step=first, tensorboard=tensorboard)
    epochs = _Epochs(log, bar, data, first, checkpointer)
    signals = _StopSignals()
    profiler = _Profiler(os.path.join(os.fspath(workdir), PROFILE_DIR), first, profile_steps, bar)
    try:
        for step in range(first, num_steps):
            profiler.before(step, state)
            batch = sharding.global_batch(next(train_iter), mesh)
            aux = sharding.global_batch(next(aux_iter), mesh) if aux_iter is not None else None
            state, step_metrics = train_step(state, batch, aux)
            done = step + 1
            epochs.pending.append((done, step_metrics))
            epoch_end = done % data.steps_per_epoch == 0 or done == num_steps
            stopping = signals.received is not None
            save = checkpoints is not None and checkpoints.due(done, num_steps, stopping)
            if epoch_end or save or done % log_every == 0:
                epochs.flush()
            if epoch_end:
                epochs.end(done, functools.partial(_test_metrics, evaluation, state, mesh))
            if save:
                checkpoints.save(done, state, (train_iter, aux_iter))
            if on_step is not None:
                on_step(done)
            if stopping and done < num_steps:
                directory = checkpointer.directory if checkpointer else None
                raise TrainingInterrupted(signals.received, done, directory)
        profiler.before(num_steps, state)
    finally:
        profiler.stop(state)
        signals.restore()
        bar.close()
        log.close()
        for it in (train_iter, aux_iter):
            if hasattr(it, "close"):
                it.close()
    return state, epochs.records


# The profiler's folder in a workdir (fit's profile_steps).
PROFILE_DIR = "profile"


class _Profiler:
    """A ``jax.profiler`` trace of ``steps`` steps after the invocation's first one (which
    compiles); the steps are waited for before the trace starts and stops, so it holds
    exactly them."""

    def __init__(self, path: str, first: int, steps: int, bar: Progress) -> None:
        self.path, self.start, self.end, self.bar = path, first + 1, first + 1 + steps, bar
        self.active = False
        self.enabled = steps > 0

    def before(self, step: int, state: TrainState) -> None:
        """Called before ``step`` runs (and with the last step count at the end)."""
        if not self.enabled:
            return
        if step == self.start and not self.active:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.path)
            self.active = True
        elif step >= self.end:
            self.stop(state)

    def stop(self, state: TrainState) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active, self.enabled = False, False
            self.bar.write(f"profile of steps {self.start + 1}-{self.end} in {self.path}")


def _test_metrics(evaluation: Evaluation | None, state: TrainState, mesh: Mesh) -> dict:
    if evaluation is None:
        return {}
    test = evaluate(evaluation.step, state, evaluation.batches(), mesh)
    return {f"test_{k}": v for k, v in test.items() if k != "count"}


class _Epochs:
    """The buffered per-step metrics: fetched at each host synchronization (where a
    non-finite loss stops the run), averaged into one ``metrics.jsonl`` record per epoch."""

    def __init__(
        self,
        log: MetricsLog,
        bar: Progress,
        data: TrainData,
        first: int,
        checkpointer: Checkpointer | None,
    ) -> None:
        self.log, self.bar, self.data, self.checkpointer = log, bar, data, checkpointer
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.metrics: list[dict[str, float]] = []
        self.records: list[dict[str, Any]] = []
        self.start_time = time.perf_counter()
        self.epoch_start = (time.perf_counter(), first)

    def flush(self) -> None:
        fetched = sharding.fetch([m for _, m in self.pending])
        for (step, _), values in zip(self.pending, fetched, strict=True):
            if not values["finite"]:
                last = self.checkpointer.latest_step() if self.checkpointer else None
                raise NonFiniteLossError(
                    f"training loss became non-finite (loss={float(values['loss'])}, "
                    f"grad_norm={float(values['grad_norm'])}) at step {step}; the run stopped. "
                    f"The newest checkpoint ({'none' if last is None else f'step {last}'}) "
                    "holds the last good state. Lower the learning rate or check the data."
                )
            self.metrics.append({k: float(v) for k, v in values.items()})
        if self.pending:
            self.bar.update(self.pending[-1][0], self.metrics[-1])
        self.pending.clear()

    def end(self, done: int, test: Callable[[], Mapping[str, float]]) -> None:
        """Writes the record of the epoch ending at step ``done`` (``test`` runs after its
        throughput is measured)."""
        record = _epoch_record(
            done, self.data.steps_per_epoch, self.metrics, self.epoch_start, self.data.batch_size
        )
        record["time"] = time.perf_counter() - self.start_time
        record.update(test())
        self.records.append(self.log.write(record))
        self.bar.write(_format_record(record))
        self.metrics.clear()
        self.epoch_start = (time.perf_counter(), done)


def _iterator_state(iterator: Any, step: int) -> Any:
    return iterator.get_state() if hasattr(iterator, "get_state") else step


# Step metrics every run has; any other key is an objective's own metric.
_STEP_METRICS = ("loss", "accuracy", "logit_norm", "lr", "grad_norm", "finite")


def _epoch_record(
    step: int,
    steps_per_epoch: int,
    metrics: list[dict[str, float]],
    epoch_start: tuple[float, int],
    batch_size: int,
) -> dict[str, Any]:
    elapsed = time.perf_counter() - epoch_start[0]
    steps = step - epoch_start[1]
    mean = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]} if metrics else {}
    # A run resumed inside an epoch averages only the steps after the resume: say so.
    in_epoch = step - ((step - 1) // steps_per_epoch) * steps_per_epoch
    partial = {"partial": True, "steps_averaged": steps} if steps < in_epoch else {}
    return {
        "step": step,
        "epoch": step / steps_per_epoch,
        "train_loss": mean.get("loss"),
        "train_accuracy": mean.get("accuracy"),
        "logit_norm": mean.get("logit_norm"),
        "lr": metrics[-1].get("lr") if metrics else None,
        "images_per_s": steps * batch_size / elapsed if elapsed > 0 else None,
        # The objective's own metrics (e.g. energy_term), epoch means.
        **{f"train_{k}": v for k, v in mean.items() if k not in _STEP_METRICS},
        **partial,
    }


def _format_record(record: Mapping[str, Any]) -> str:
    parts = [f"epoch {record['epoch']:.2f} step {record['step']}"]
    for key in ("train_loss", "train_accuracy", "logit_norm", "test_accuracy", "images_per_s"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.4g}")
    return " | ".join(parts)
