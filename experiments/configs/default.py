"""Training presets: ``paper``, ``cpu`` and ``smoke`` (``get_config("cpu,ce")``).

``get_config(arg)`` takes ``"preset[,objective]"`` (the ``config_flags``
convention: ``--config=experiments/configs/default.py:cpu,ce`` works too) and
returns a ConfigDict; every field can be overridden on the command line
(``--config.optim.lr=0.05``). The objective's hyperparameters are not listed
here: the runner fills ``objective.hparams`` from the objective's registration
(``ood_jax.train.register_objective``) and the in-distribution dataset's spec
(``ood_jax.data.register_dataset``), so any registered objective trains with
any preset.

- ``paper``: the LogitNorm paper's recipe (Wei et al., ICML 2022): WRN-40-2
  (dropout 0.3), 200 epochs, batch 128, SGD Nesterov momentum 0.9, lr 0.1
  divided by 10 at epochs 80 and 140, weight decay 5e-4 (on all parameters, as
  PyTorch), crop + flip. LogitNorm's tau comes from its registration (0.04, the
  paper's; the authors' README command uses 0.01). Default on accelerators.
- ``cpu``: a smaller model and a short schedule for real CIFAR-10 (JPEG) from
  the offline data on a 2-core CPU (target: < 30 minutes, >= 80% test accuracy).
- ``smoke``: a tiny model on a small subset, a few dozen steps: under a minute,
  for tests and a first try.

The ``eval`` section (the end-of-training OOD report) is not spelled out here:
each preset names its evaluation preset (:data:`EVAL_PRESET`, from
``experiments.configs.eval_presets``; ``paper`` -> ``paper``, ``cpu`` -> ``cpu``,
``smoke`` -> ``smoke`` with the report off unless ``--config.eval.ood=true``).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import eval_presets

PRESETS = ("paper", "cpu", "smoke")
# config.data.on_device's default for every preset: the host pipeline. Measured on a
# quiet 2-core CPU (benchmarks/results/input_pipeline.md, 2026-12-06), the cpu preset's
# CE trained as fast with the data on the device (530 against 532 images/s, medians of
# 5 runs each): on a CPU the "device" is the host's own cores, so there is nothing to
# take off the host. It is the option for accelerators whose host cannot keep up.
ON_DEVICE_DEFAULT = False
# The evaluation preset (experiments.configs.eval_presets) each training preset's
# report uses, before the preset's own changes (smoke: no report unless asked for).
EVAL_PRESET = {"paper": "paper", "cpu": "cpu", "smoke": "smoke"}


# Long by design: one line per config field with its comment (a listing, as Flax's configs).
def get_config(arg: str = "paper", objective: str | None = None) -> ml_collections.ConfigDict:
    """The configuration of ``preset`` for training with ``objective``.

    ``arg`` is ``"preset"`` or ``"preset,objective"``; ``objective`` (default
    ``logitnorm``) may also be passed separately.
    """
    preset, _, named = arg.partition(",")
    objective = objective or named or "logitnorm"
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}.")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    # Modules imported before anything is built: where user code registers its own
    # objectives, scores and datasets (e.g. --config.imports=my_project.objectives).
    c.imports = ()

    c.model = ml_collections.ConfigDict()
    c.model.name = "wrn40_2"
    c.model.options = ml_collections.ConfigDict({"dropout_rate": 0.3})
    # bfloat16 compute with float32 parameters (accelerators; slow on CPU).
    c.model.mixed_precision = False

    c.objective = ml_collections.ConfigDict()
    c.objective.name = objective
    # Filled by the runner from the registration (defaults) and the dataset's spec.
    c.objective.hparams = ml_collections.ConfigDict()
    # Hyperparameters set from the data before training (energy fine-tuning's margins
    # m_in / m_out: the initial model's mean energy on in-distribution / outlier data).
    c.objective.auto = ()

    c.data = ml_collections.ConfigDict()
    # In-distribution dataset by registered name (ood_jax.data.available_datasets()).
    c.data.dataset = "cifar10"
    # "tfds", "local" (the offline files in $OOD_JAX_DATA_DIR or ../shared/data), or a
    # folder holding <dataset>_{train,test}.npz or {train,test}/<class>/ images.
    c.data.source = "tfds"
    # 0 = all examples; N > 0 = a random subset of N, seeded by `seed` (quick runs; the
    # offline files are sorted by class, so the first N would miss classes).
    c.data.train_limit = 0
    c.data.test_limit = 0
    c.data.augment = True  # random crop 32 (pad 4) + horizontal flip
    # Data on the device (docs/training.md): the train split (and the outliers) placed
    # on the devices once as uint8, each batch gathered, cropped, flipped and normalized
    # inside the train step; the same batches as the host pipeline (False).
    c.data.on_device = ON_DEVICE_DEFAULT
    c.data.eval_batch_size = 500
    # Auxiliary outliers, used only by objectives that need them (outlier exposure,
    # energy): a dataset name (registered, tfds:<name>, npz:<file>, folder:<root>) or an
    # .npz file / image folder path; `ratio` outlier images per in-distribution image.
    c.data.outliers = ml_collections.ConfigDict()
    c.data.outliers.source = "tinyimagenet_train"
    c.data.outliers.split = "train"
    c.data.outliers.ratio = 2

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
    # A workdir whose newest checkpoint gives the initial weights and BatchNorm
    # statistics (fine-tuning; a fresh optimizer). "" = train from scratch.
    c.train.init_from = ""
    # Resuming with changed run settings (lr, epochs, loss hyperparameters, ...) is an
    # error unless this is true; the change is then recorded in changes.jsonl.
    c.train.allow_changes = False
    c.train.progress = True
    # JAX's persistent compilation cache, shared by runs: a second start (a resume, a
    # seed, the evaluation command) loads its programs instead of compiling them.
    # "" = $OOD_JAX_COMPILATION_CACHE, else <user cache>/ood_jax/jax; "off" = none; or a
    # folder.
    c.train.compilation_cache = ""
    # TensorBoard event files in <workdir>/tensorboard (train/: the metrics.jsonl curves,
    # eval/: the OOD report's AUROC and FPR95): tensorboard --logdir runs/
    c.train.tensorboard = True
    # N > 0: a jax.profiler trace of N steps after the first (compiling) one, in
    # <workdir>/profile (TensorBoard's profile plugin or Perfetto).
    c.train.profile_steps = 0

    # The OOD report's settings: the evaluation preset this preset names
    # (experiments.configs.eval_presets), changed below where the preset says so.
    c.eval = eval_presets.section(EVAL_PRESET[preset])

    if preset in _PRESET_CHANGES:
        _PRESET_CHANGES[preset](c)
    return c


def _cpu(c: ml_collections.ConfigDict) -> None:
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


def _smoke(c: ml_collections.ConfigDict) -> None:
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
    # OOD report (the smoke evaluation preset's, on file-free synthetic sets).
    c.eval.ood = False


# How each preset differs from the paper's configuration.
_PRESET_CHANGES = {"cpu": _cpu, "smoke": _smoke}
