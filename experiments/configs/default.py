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
"""

from __future__ import annotations

import ml_collections

from ood_jax import data as D

PRESETS = ("paper", "cpu", "smoke")
# CIFAR-10's OOD suite without tfds (its spec's) plus the synthetic sets of the papers.
CPU_OOD_SETS = (
    *D.get_dataset_spec("cifar10").default_ood_sets("local"),
    *D.SYNTHETIC_OOD_SETS,
)


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

    c.eval = ml_collections.ConfigDict()
    # Full OOD evaluation at the end (ood_jax.evaluate, report in <workdir>/eval);
    # False = test accuracy only. Set names: ood_jax.evaluate.datasets.
    c.eval.ood = True
    # OOD set names (ood_jax.evaluate.load_ood_sets); () = the dataset's default suite.
    c.eval.ood_sets = ()
    # Score names (ood_jax.scores.available_scores()); () = every registered score.
    c.eval.scores = ()
    c.eval.protocols = ("papers", "full")
    c.eval.convention = "hendrycks"
    c.eval.num_draws = 10
    c.eval.num_synthetic = 2000
    c.eval.max_train = 10000
    # CPU budget: OOD examples per set (0 = all).
    c.eval.max_ood = 0
    # Redo the OOD report of a finished run whose eval/results.json is of the same
    # step and settings (a rerun skips it otherwise).
    c.eval.force = False
    # The ACET paper's adversarial-noise OOD set: this many uniform-noise images
    # attacked against the evaluated model (0 = none), with an L-inf PGD of
    # attack_steps steps and radius attack_eps in [0, 1] pixel space.
    c.eval.adversarial_noise = 2000
    c.eval.attack_steps = 40
    c.eval.attack_eps = 0.3
    # {score: {hyperparameter: value}} over the registered defaults; the runner adds
    # every registered score's defaults, so e.g. --config.eval.score_hparams.knn.k=20.
    c.eval.score_hparams = ml_collections.ConfigDict()
    # OpenOOD's search on a validation pair (docs/detectors.md): each score named here
    # ("all": every chosen score with a grid) takes the value of best validation AUROC
    # from its grid; () = the registered values, no search.
    c.eval.tune = ()
    # The OOD validation set, never one of ood_sets. Tiny ImageNet train images: none is
    # a TinyImageNet-crop/resize test image, but their classes are shared.
    c.eval.tune_ood = "tinyimagenet_train:train"
    # {score: {hyperparameter: values}} replacing its registered grid, e.g.
    # --config.eval.tune_grids.knn.k=10,20,50.
    c.eval.tune_grids = ml_collections.ConfigDict()
    # ID training images held out from the fits for validation (tune, fit_on_val); also
    # the size of the OOD validation subset.
    c.eval.val_size = 1000
    # Fitted scores fitted on that held-out split instead of the training set.
    c.eval.fit_on_val = ()

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
    c.eval.ood_sets = CPU_OOD_SETS
    c.eval.max_train = 10000
    # The full OOD sets, and every score (ODIN too) on the same examples: the
    # papers' draws of 2,000 then differ from draw to draw.
    c.eval.max_ood = 0
    c.eval.adversarial_noise = 1000
    c.eval.score_hparams = ml_collections.ConfigDict({"knn": {"max_train": 10000}})


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
    # OOD report on file-free synthetic sets.
    c.eval.ood = False
    c.eval.ood_sets = ("gaussian", "uniform")
    c.eval.max_train = 512
    c.eval.adversarial_noise = 64
    c.eval.attack_steps = 5


# How each preset differs from the paper's configuration.
_PRESET_CHANGES = {"cpu": _cpu, "smoke": _smoke}
