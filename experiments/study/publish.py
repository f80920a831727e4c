"""Publishing the study's finished runs as ``ood_jax.pretrained`` checkpoints."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from experiments.study.plan import Run


def data_name(config: dict) -> str:
    """The dataset a run actually trained on: ``cifar10`` from the offline files is
    ``cifar10_jpeg`` (their images went through JPEG)."""
    from ood_jax import data as D

    return D.spec_for_source(config["data"]["dataset"], config["data"]["source"]).name


def published_name(run: Run, results: dict) -> str:
    """``<dataset>/<model>/<run>``: ``cifar10_jpeg/resnet9/logitnorm/seed0`` (sweep runs:
    ``cifar10_jpeg/resnet9/sweep/<variant>/seed0``)."""
    return f"{data_name(results['config'])}/{results['model']['name']}/{run.name}"


def publish(
    root: str,
    folder: str,
    runs: Sequence[Run],
    name_of: Callable[[Run, dict], str] = published_name,
) -> list[str]:
    """Exports each finished run's final weights to ``folder`` (``ood_jax.pretrained``
    format, with ``manifest.json``) under the name ``name_of(run, results)``; runs
    already published at their final step are left as they are. Returns the names
    published now."""
    from experiments.study.report import load_runs
    from experiments.workdir import Workdir
    from ood_jax import pretrained

    try:
        have = {n: pretrained.info(n, folder) for n in pretrained.available(folder)}
    except pretrained.PretrainedError:
        have = {}
    done = []
    for entry in load_runs(root, runs).values():
        run, results = entry["run"], entry["results"]
        workdir = os.path.join(root, run.name)
        step = results["checkpoint"]["step"]
        name = name_of(run, results)
        if name in have and have[name]["step"] == step:
            continue
        with Workdir(workdir) as run_dir:
            _, params, batch_stats, metadata, step = run_dir.restore(step=step)
        export_weights(
            folder,
            name,
            params,
            batch_stats,
            metadata,
            step,
            normalization=results["data"]["normalization"],
            method=run.method,
            seed=run.seed,
            test_accuracy=results["classification"]["accuracy"],
            test_examples=results["data"]["id"]["num_examples"],
            run=run.name,
        )
        done.append(name)
    return done


def export_weights(
    folder: str, name: str, params: Any, batch_stats: Any, metadata: dict, step: int, **entry: Any
) -> dict:
    """Exports a restored checkpoint's weights to ``folder`` as ``name``
    (``ood_jax.pretrained`` format); its manifest entry records the model, dataset,
    step, evaluation batch size and config from the checkpoint's ``metadata``, plus
    ``entry`` (normalization, method, seed, accuracy, ...). Returns the entry."""
    from ood_jax import pretrained

    config = metadata["config"]
    return pretrained.export(
        folder,
        name,
        params=params,
        batch_stats=batch_stats,
        entry={
            "model": metadata["model"],
            "dataset": data_name(config),
            "step": step,
            "eval_batch_size": config["data"]["eval_batch_size"],
            "config": config,
            **entry,
        },
    )
