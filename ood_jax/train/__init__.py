"""Training: optimizer, train state, pure train/eval steps, and the training loop.

Data flow: host batches -> :mod:`ood_jax.sharding` global arrays -> the jitted
``train_step(state, batch, aux_batch=None) -> (state, metrics)`` -> orbax
checkpoints (:mod:`ood_jax.checkpoint`) and ``metrics.jsonl``. With the data on the
device the host hands the step only each step's plan (rows, crop, flip) and the step
makes the batch from the split it holds (:mod:`ood_jax.data.device`).
"""

from ood_jax.train.loop import (
    CheckpointPolicy,
    Evaluation,
    NonFiniteLossError,
    TrainData,
    evaluate,
    fit,
    restore_or_initialize,
)
from ood_jax.train.objectives import (
    Loss,
    Objective,
    available_objectives,
    bind_objective,
    forward_with_outliers,
    get_objective,
    register_objective,
    resolve_hparams,
)
from ood_jax.train.optim import SCHEDULES, make_optimizer, make_schedule
from ood_jax.train.state import ModelDef, TrainState, create_train_state, split_model
from ood_jax.train.step import (
    compile_eval_step,
    compile_train_step,
    make_eval_step,
    make_train_step,
)

__all__ = [
    "SCHEDULES",
    "CheckpointPolicy",
    "Evaluation",
    "ModelDef",
    "NonFiniteLossError",
    "Loss",
    "Objective",
    "TrainData",
    "TrainState",
    "available_objectives",
    "bind_objective",
    "compile_eval_step",
    "compile_train_step",
    "create_train_state",
    "evaluate",
    "fit",
    "forward_with_outliers",
    "get_objective",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "register_objective",
    "resolve_hparams",
    "restore_or_initialize",
    "split_model",
]
