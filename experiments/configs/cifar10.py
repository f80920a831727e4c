"""CIFAR-10 training presets: ``paper``, ``cpu`` and ``smoke``.

``get_config(preset, objective)`` returns a ConfigDict; every field can be
overridden on the command line (``--config.optim.lr=0.05``).

- ``paper``: the LogitNorm paper's recipe (Wei et al., ICML 2022; REFERENCE.md):
  WRN-40-2 (dropout 0.3), 200 epochs, batch 128, SGD Nesterov momentum 0.9,
  lr 0.1 divided by 10 at epochs 80 and 140, weight decay 5e-4 (on all
  parameters, as PyTorch), crop + flip, tau = 0.04 (recorded explicitly: the
  authors' README command uses 0.01). Default on accelerators.
- ``cpu``: a smaller model and a short schedule for real CIFAR-10 (JPEG) from
  ``../shared/data`` on a 2-core CPU (target: < 30 minutes, >= 80% test
  accuracy). Model, width, epochs, lr and batch are all fields here.
- ``smoke``: a tiny model on a small subset, a few dozen steps: under a minute,
  for tests and a first try.
"""

from __future__ import annotations

import ml_collections

PRESETS = ("paper", "cpu", "smoke")
# The offline OOD sets (../shared/data) plus the synthetic sets of the papers.
CPU_OOD_SETS = (
    "tinyimagenet_crop",
    "tinyimagenet_resize",
    "textures_partial",
    "gaussian",
    "uniform",
    "rademacher",
    "blobs",
    "lowpass_uniform",
    "permuted_pixels",
)
OBJECTIVE_HPARAMS = {
    "ce": {},
    "logitnorm": {"temperature": 0.04},
    "feature_norm": {},
}


def get_config(preset: str = "paper", objective: str = "logitnorm") -> ml_collections.ConfigDict:
    """The configuration of ``preset`` for training with ``objective``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}.")
    if objective not in OBJECTIVE_HPARAMS:
        raise ValueError(
            f"objective must be one of {sorted(OBJECTIVE_HPARAMS)}, got {objective!r}."
        )
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "wrn40_2"
    c.model.options = ml_collections.ConfigDict({"dropout_rate": 0.3})
    # bfloat16 compute with float32 parameters (accelerators; slow on CPU).
    c.model.mixed_precision = False

    c.objective = ml_collections.ConfigDict()
    c.objective.name = objective
    c.objective.hparams = ml_collections.ConfigDict(dict(OBJECTIVE_HPARAMS[objective]))

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "cifar10"
    # "tfds", "local" (the offline npz files in ../shared/data or $OOD_JAX_DATA_DIR), or a
    # path: a folder holding cifar10_{train,test}.npz, or <path>/{train,test}/<class>/ images.
    c.data.source = "tfds"
    c.data.train_limit = 0  # 0 = all examples; >0 = the first N (quick runs)
    c.data.test_limit = 0
    c.data.augment = True  # random crop 32 (pad 4) + horizontal flip
    c.data.eval_batch_size = 500

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 0.1
    c.optim.momentum = 0.9
    c.optim.nesterov = True
    c.optim.weight_decay = 5e-4
    c.optim.schedule = "step"  # constant | step | cosine | onecycle
    c.optim.boundaries_epochs = (80, 140)
    c.optim.decay_factor = 0.1
    c.optim.final_lr = 0.0
    c.optim.warmup_epochs = 0.0
    c.optim.peak_fraction = 0.3

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 200
    c.train.num_steps = 0  # 0 = epochs * steps_per_epoch
    c.train.batch_size = 128
    c.train.log_every = 50
    c.train.checkpoint_every = 0  # steps; 0 = once per epoch
    c.train.max_to_keep = 3
    c.train.num_devices = 0  # 0 = all devices
    c.train.progress = True

    c.eval = ml_collections.ConfigDict()
    # Full OOD evaluation at the end (ood_jax.evaluate, report in <workdir>/eval);
    # False = test accuracy only. Set names: ood_jax.evaluate.datasets.
    c.eval.ood = True
    c.eval.ood_sets = ("textures_partial", "tinyimagenet_crop", "tinyimagenet_resize")
    c.eval.max_train = 10000
    # CPU budgets for the end-of-training report (0 = no limit): OOD examples per set,
    # images per set for ODIN's gradient pass, KNN training bank.
    c.eval.max_ood = 0
    c.eval.odin_max_examples = 0
    c.eval.knn_max_train = 0

    if preset == "cpu":
        # ResNet-9 (DAWNBench) at width 16 (413k parameters, max global pooling) with a
        # one-cycle schedule: about 400 images/s per train step on an idle 2-core CPU
        # (with the experiments' XLA flag), so 11 epochs take about 24 minutes. 7 epochs
        # (15.5 min) reached 78.2% on CIFAR-10 (JPEG); results in results/cpu_logitnorm/.
        c.model.name = "resnet9"
        c.model.options = ml_collections.ConfigDict({"width": 16, "pooling": "max"})
        c.data.source = "local"
        c.optim.lr = 0.4
        c.optim.schedule = "onecycle"
        c.optim.peak_fraction = 0.2
        c.optim.final_lr = 0.0
        c.train.epochs = 11
        c.train.batch_size = 256
        c.train.log_every = 20
        c.eval.ood_sets = CPU_OOD_SETS
        c.eval.max_train = 10000
        c.eval.max_ood = 2000
        c.eval.odin_max_examples = 1000
        c.eval.knn_max_train = 10000
    elif preset == "smoke":
        c.model.name = "tiny"
        c.model.options = ml_collections.ConfigDict({"width": 8, "dropout_rate": 0.0})
        c.data.source = "local"
        c.data.train_limit = 1024
        c.data.test_limit = 512
        c.data.eval_batch_size = 256
        c.optim.lr = 0.05
        c.optim.schedule = "cosine"
        c.train.epochs = 2
        c.train.batch_size = 64
        c.train.log_every = 8
        # Test accuracy only, to stay under a minute; --config.eval.ood=true adds the
        # OOD report on file-free synthetic sets.
        c.eval.ood = False
        c.eval.ood_sets = ("gaussian", "uniform")
        c.eval.max_train = 512
    return c
