"""``python -m experiments.evaluate --torch_checkpoint FILE --arch NAME``: a PyTorch file's report.

The file is read without running code from it (``ood_jax.interop``), converted to
the ood_jax model of ``--arch``, and evaluated through the same path as a
workdir (:func:`experiments.evaluation.report_from_settings`) with the settings
of an evaluation preset (``--eval_preset``, :mod:`experiments.configs.eval_presets`):
no training method or preset is involved.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import jax
import ml_collections

from experiments import cli, torch_import
from experiments.configs import eval_presets
from experiments.evaluation import Provenance, report_config, report_from_settings
from experiments.run_config import resolve
from ood_jax import data as D
from ood_jax import interop


# One parameter per command-line flag, as evaluate_workdir.
def evaluate_torch(
    path: str,
    arch: str,
    *,
    normalization: str | None = None,
    num_classes: int | None = None,
    eval_preset: str = "paper",
    data: str | None = None,
    data_dir: str | None = None,
    overrides: Sequence[str] = (),
    batch_size: int | None = None,
    out_dir: str | None = None,
    command: str = "",
) -> dict:
    """Evaluates a PyTorch checkpoint like a workdir; returns the ``results.json`` dict.

    The file is read without running code from it and converted exactly to the
    ood_jax model of ``arch`` (see ``experiments.torch_import.load_for_evaluation``).
    The evaluation's config is evaluation preset ``eval_preset``'s
    (:func:`experiments.configs.eval_presets.get_config`: its data source and subsets,
    and ``eval`` settings) with the imported model's identity; ``data`` and
    ``overrides`` change it as for a workdir (``--config.model.options.*`` give the
    options of a non-standard width, ``--config.data.dataset`` the in-distribution
    set). Inputs are normalized with ``normalization`` (default: the one the
    architecture's authors used). The report (in ``runs/torch/<file stem>/eval``
    unless ``out_dir``) records the file, its sha256, the architecture and the
    normalization.
    """
    if data_dir is not None and not os.path.isdir(data_dir):
        raise cli.UsageError(f"--data_dir {data_dir!r} is not a folder.")
    config = report_config(eval_presets.get_config(eval_preset), data=data, overrides=overrides)
    imported = torch_import.load_for_evaluation(
        path,
        arch,
        normalization=normalization,
        num_classes=num_classes,
        options=config.model.options.to_dict(),
    )
    classes = D.get_dataset_spec(config.data.dataset).num_classes
    if imported.identity["num_classes"] != classes:
        raise cli.UsageError(
            f"{path}: the model has {imported.identity['num_classes']} classes, "
            f"{config.data.dataset!r} has {classes}; choose the dataset it was trained on "
            "(--dataset)."
        )
    config.model.name = imported.identity["name"]
    config.model.options = ml_collections.ConfigDict(imported.identity["options"])
    provenance = Provenance(
        command=command,
        step=0,
        published={
            "torch_checkpoint": os.path.abspath(path),
            **{k: v for k, v in imported.provenance.items() if k != "path"},
            "num_classes": classes,
            "mean": list(imported.mean),
            "std": list(imported.std),
        },
        normalization=(imported.mean, imported.std),
    )
    stem = os.path.splitext(os.path.basename(path))[0]
    settings = resolve(config)
    return report_from_settings(
        settings,
        imported.model,
        provenance,
        out_dir=os.path.join("runs", "torch", stem, "eval") if out_dir is None else out_dir,
        batch_size=batch_size,
        data_dir=data_dir,
    )


# The flags that describe a PyTorch file (errors without --torch_checkpoint).
TORCH_FLAGS = ("arch", "normalization", "num_classes", "dataset")


def evaluate_torch_args(args: argparse.Namespace, overrides: list[str], command: str) -> dict:
    if args.arch is None:
        raise cli.UsageError(
            f"--torch_checkpoint needs --arch (one of {', '.join(interop.ARCH_NAMES)})."
        )
    if args.step is not None:
        raise cli.UsageError(
            "--step applies to a --workdir; a PyTorch file has one set of weights."
        )
    preset = args.eval_preset or ("cpu" if jax.default_backend() == "cpu" else "paper")
    if args.eval_preset is None:
        print(f"no --eval_preset given: using '{preset}' for the {jax.default_backend()} backend")
    dataset = [] if args.dataset is None else [f"--config.data.dataset={args.dataset}"]
    return evaluate_torch(
        args.torch_checkpoint,
        args.arch,
        normalization=args.normalization,
        num_classes=args.num_classes,
        eval_preset=preset,
        data=args.data,
        data_dir=args.data_dir,
        overrides=[*dataset, *overrides],
        batch_size=args.batch_size,
        out_dir=args.out_dir,
        command=command,
    )
