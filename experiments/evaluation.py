"""A run's OOD report: its resolved settings -> ``ood_jax.evaluate.run_evaluation``.

The one path behind both the end-of-training report (``experiments.train``) and
``python -m experiments.evaluate``: the same :class:`~experiments.run_config.RunSettings`
give the same sets, scores, hyperparameters, budgets and seeds, so both give
identical numbers for the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
from flax import nnx

from experiments import compile_cache
from experiments.data import display_name, load_splits, near_auxiliary_notes
from experiments.run_config import RunSettings, eval_batch_size, parse
from ood_jax import data as D
from ood_jax import sharding
from ood_jax.evaluate import load_ood_sets, report_scalars, run_evaluation
from ood_jax.evaluate.datasets import load_ood_set
from ood_jax.train.logging import TENSORBOARD_DIR, TensorBoardLog


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where the evaluated model came from, recorded in the report.

    Attributes:
      command: the command line that asked for the report.
      step: the checkpoint's training step.
      workdir: the training run's folder (its ``metrics.jsonl`` gives the
        logit-norm curve); None for a model from elsewhere.
      published: the ``checkpoint`` entry of a model that is not a workdir's,
        recorded instead of the workdir: ``{"published": name, "sha256": ...,
        "step": ...}`` of a published checkpoint, ``{"torch_checkpoint": path,
        "sha256": ..., "arch": ..., "normalization": ..., ...}`` of an imported
        PyTorch file.
      normalization: ``(mean, std)`` the model's inputs are normalized with, when
        it is not the dataset's (a PyTorch model trained with its authors' own).
    """

    command: str
    step: int
    workdir: str | None = None
    published: dict | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def checkpoint(self) -> dict:
        """The report's ``checkpoint`` entry."""
        if self.published is not None:
            return dict(self.published)
        return {"workdir": os.path.abspath(self.workdir), "step": self.step}


def finished_report(out_dir: str, *, step: int, config: ml_collections.ConfigDict) -> dict | None:
    """The complete report in ``out_dir`` of this ``step`` and ``config`` (``eval.force``
    aside), or None: a rerun of a finished run need not redo it."""
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not results.get("complete"):
        return None
    same_step = (results.get("checkpoint") or {}).get("step") == step
    return results if same_step and _settings(results.get("config")) == _settings(config) else None


def _settings(config: Any) -> Any:
    """A config as JSON values, without the field that only asks to redo the report."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    values = json.loads(json.dumps(config, default=str))
    if isinstance(values, dict) and isinstance(values.get("eval"), dict):
        values["eval"].pop("force", None)
    return values


def ood_report(
    settings: RunSettings,
    model: nnx.Module,
    *,
    train_ds: D.ImageDataset,
    test_ds: D.ImageDataset,
    provenance: Provenance,
    out_dir: str,
    batch_size: int,
    data_dir: str | None = None,
) -> dict:
    """The OOD report of a trained model, as ``settings`` describe it.

    ``data_dir``: the folder of the offline OOD files (default: ``$OOD_JAX_DATA_DIR``).
    Returns the ``results.json`` dict.
    """
    config, names = settings.config, list(settings.ood_sets)
    spec = dataclasses.replace(settings.eval, batch_size=batch_size)
    if provenance.normalization is not None:
        mean, std = provenance.normalization
        spec = dataclasses.replace(spec, mean=mean, std=std)
    print(f"OOD evaluation: loading {len(names)} OOD sets ({', '.join(names)})")
    ood_sets = load_ood_sets(
        names,
        data_dir=data_dir,
        num_synthetic=config.eval.num_synthetic,
        seed=config.seed,
        id_test=test_ds,
    )
    val_ood = None
    if spec.tune:
        print(f"OOD evaluation: loading the OOD validation set {config.eval.tune_ood}")
        val_ood = load_ood_set(
            config.eval.tune_ood,
            data_dir=data_dir,
            num_synthetic=config.eval.num_synthetic,
            seed=config.seed,
            id_test=test_ds,
        )
    results = run_evaluation(
        model,
        spec,
        id_test=test_ds,
        ood_sets=ood_sets,
        train=train_ds,
        val_ood=val_ood,
        out_dir=out_dir,
        metrics_log_dir=provenance.workdir,
        metadata={
            "command": provenance.command,
            "checkpoint": provenance.checkpoint(),
            "model": {"name": config.model.name, "options": config.model.options.to_dict()},
            "config": config.to_dict(),
            "dataset": display_name(test_ds),
            "set_notes": near_auxiliary_notes(config, names),
        },
        progress=lambda message: print(f"OOD evaluation: {message}", flush=True),
    )
    if config.train.get("tensorboard", False):
        write_report_events(out_dir, results, step=provenance.step)
    return results


def write_report_events(out_dir: str, results: dict, *, step: int) -> str:
    """The report's AUROC, FPR95, accuracy and ECE as TensorBoard scalars at ``step``,
    beside the report (``<run>/eval`` -> ``<run>/tensorboard/eval``), rewritten with it;
    returns the folder."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    logdir = os.path.join(parent, TENSORBOARD_DIR, name)
    events = TensorBoardLog(logdir)
    events.add(report_scalars(results), step)
    events.close()
    return logdir


def report_config(
    config: ml_collections.ConfigDict, *, data: str | None, overrides: Sequence[str]
) -> ml_collections.ConfigDict:
    """``config`` with ``--data`` and the ``--config.*`` overrides (:func:`parse`), its
    OOD report on (whatever the run itself did at its end); :func:`resolve` it next."""
    if data is not None:
        config.data.source = data
    config = parse(config, overrides)
    config.eval.ood = True
    return config


def report_from_settings(
    settings: RunSettings,
    model: Any,
    provenance: Provenance,
    *,
    out_dir: str,
    batch_size: int | None,
    data_dir: str | None,
) -> dict:
    """:func:`ood_report` on the splits ``settings.config.data`` names (the CLI's
    evaluations)."""
    compile_cache.use(settings.config.train.get("compilation_cache", ""))
    train_ds, test_ds = load_splits(settings.config, data_dir=data_dir)
    default_batch = eval_batch_size(settings.config, sharding.make_mesh())
    return ood_report(
        settings,
        model,
        train_ds=train_ds,
        test_ds=test_ds,
        provenance=provenance,
        out_dir=out_dir,
        batch_size=batch_size if batch_size is not None else default_batch,
        data_dir=data_dir,
    )
