"""Evaluation presets: the OOD report's settings, ``paper``, ``cpu`` and ``smoke``.

An evaluation preset is one ``config.eval`` section (:func:`section`): the OOD
sets, the scores and their hyperparameters, the protocols and convention, the
draws, the budgets, the adversarial-noise set and the validation search. Every
OOD report takes its settings from one:

- a training run: its training preset names its evaluation preset
  (``experiments.configs.default.EVAL_PRESET``), and the end of training writes
  the report with it;
- ``python -m experiments.evaluate --workdir DIR`` or ``--pretrained NAME``: the
  run's own recorded section by default, ``--eval_preset NAME`` replaces it with
  the preset's;
- ``python -m experiments.evaluate --torch_checkpoint FILE``: ``--eval_preset
  NAME`` (default ``cpu`` on a CPU backend, ``paper`` otherwise) gives the whole
  config (:func:`get_config`): the section, plus the in-distribution data that a
  model without a training run is evaluated on.

Every field stays overridable on the command line (``--config.eval.max_ood=2000``).

- ``paper``: the papers' protocol: the in-distribution dataset's default OOD
  suite for its data source (tfds by default), every registered score, both
  protocols (the papers' 10 draws of N_id // 5 OOD examples, and the full sets),
  the Hendrycks convention, fitted scores on 10,000 training images, and the
  ACET paper's adversarial-noise set (2,000 images, 40 PGD steps).
- ``cpu``: the CPU runs' report: CIFAR-10's offline suite plus the synthetic
  sets, the full OOD sets, every score (ODIN too) on the same examples, a
  1,000-image adversarial-noise set, KNN on 10,000 training images; its data
  (for a model without a run) the offline files.
- ``smoke``: tiny, for tests and a first try: two file-free synthetic sets,
  scores fitted on 512 training images, a 64-image adversarial-noise set of 5
  steps; its data a small subset of the offline files.
"""

from __future__ import annotations

import ml_collections

from ood_jax import data as D

EVAL_PRESETS = ("paper", "cpu", "smoke")
# CIFAR-10's OOD suite without tfds (its spec's) plus the synthetic sets of the papers.
CPU_OOD_SETS = (
    *D.get_dataset_spec("cifar10").default_ood_sets("local"),
    *D.SYNTHETIC_OOD_SETS,
)


def check(name: str) -> None:
    """A ValueError (one line, exit status 2 from a command) unless ``name`` is a preset."""
    if name not in EVAL_PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; known: {', '.join(EVAL_PRESETS)}.")


# Long by design: one line per config field with its comment (a listing, as Flax's configs).
def section(name: str) -> ml_collections.ConfigDict:
    """The ``config.eval`` section of evaluation preset ``name``."""
    check(name)
    e = ml_collections.ConfigDict()
    # Full OOD evaluation at the end of training (ood_jax.evaluate, report in
    # <workdir>/eval); False = test accuracy only. The evaluation command always
    # writes the report. Set names: ood_jax.evaluate.datasets.
    e.ood = True
    # OOD set names (ood_jax.evaluate.load_ood_sets); () = the dataset's default suite.
    e.ood_sets = ()
    # Score names (ood_jax.scores.available_scores()); () = every registered score.
    e.scores = ()
    e.protocols = ("papers", "full")
    e.convention = "hendrycks"
    e.num_draws = 10
    e.num_synthetic = 2000
    e.max_train = 10000
    # CPU budget: OOD examples per set (0 = all).
    e.max_ood = 0
    # Redo the OOD report of a finished run whose eval/results.json is of the same
    # step and settings (a rerun skips it otherwise).
    e.force = False
    # The ACET paper's adversarial-noise OOD set: this many uniform-noise images
    # attacked against the evaluated model (0 = none), with an L-inf PGD of
    # attack_steps steps and radius attack_eps in [0, 1] pixel space.
    e.adversarial_noise = 2000
    e.attack_steps = 40
    e.attack_eps = 0.3
    # {score: {hyperparameter: value}} over the registered defaults; the runner adds
    # every registered score's defaults, so e.g. --config.eval.score_hparams.knn.k=20.
    e.score_hparams = ml_collections.ConfigDict()
    # OpenOOD's search on a validation pair (docs/detectors.md): each score named here
    # ("all": every chosen score with a grid) takes the value of best validation AUROC
    # from its grid; () = the registered values, no search.
    e.tune = ()
    # The OOD validation set, never one of ood_sets. Tiny ImageNet train images: none is
    # a TinyImageNet-crop/resize test image, but their classes are shared.
    e.tune_ood = "tinyimagenet_train:train"
    # {score: {hyperparameter: values}} replacing its registered grid, e.g.
    # --config.eval.tune_grids.knn.k=10,20,50.
    e.tune_grids = ml_collections.ConfigDict()
    # ID training images held out from the fits for validation (tune, fit_on_val); also
    # the size of the OOD validation subset.
    e.val_size = 1000
    # Fitted scores fitted on that held-out split instead of the training set.
    e.fit_on_val = ()
    if name in _SECTION_CHANGES:
        _SECTION_CHANGES[name](e)
    return e


def _cpu(e: ml_collections.ConfigDict) -> None:
    e.ood_sets = CPU_OOD_SETS
    e.max_train = 10000
    # The full OOD sets, and every score (ODIN too) on the same examples: the
    # papers' draws of 2,000 then differ from draw to draw.
    e.max_ood = 0
    e.adversarial_noise = 1000
    e.score_hparams = ml_collections.ConfigDict({"knn": {"max_train": 10000}})


def _smoke(e: ml_collections.ConfigDict) -> None:
    # File-free synthetic sets: no data folder needed.
    e.ood_sets = ("gaussian", "uniform")
    e.max_train = 512
    e.adversarial_noise = 64
    e.attack_steps = 5


# How each preset's section differs from the papers' protocol.
_SECTION_CHANGES = {"cpu": _cpu, "smoke": _smoke}

# The in-distribution data a model without a training run (a PyTorch file) is
# evaluated on, per preset: data source, the seeded subsets' sizes (0 = all) and
# the eval batch size. A run's own data comes from its config.
_DATA = {
    "paper": {"source": "tfds", "train_limit": 0, "test_limit": 0, "eval_batch_size": 500},
    "cpu": {"source": "local", "train_limit": 0, "test_limit": 0, "eval_batch_size": 500},
    "smoke": {"source": "local", "train_limit": 1024, "test_limit": 512, "eval_batch_size": 256},
}


def get_config(name: str) -> ml_collections.ConfigDict:
    """The whole config of evaluation preset ``name`` for a model without a training run.

    No training fields (no objective, optimizer or schedule): the model (its
    identity is the imported one's), the in-distribution data it is evaluated on
    (``data.source``, ``train_limit`` and ``test_limit``: the fits' training subset
    and the test subset, seeded by ``seed``), the command's compilation cache and
    TensorBoard events (``train.*``, named as in a training run's config) and the
    report's settings (:func:`section`).
    """
    check(name)
    c = ml_collections.ConfigDict()
    c.eval_preset = name
    c.seed = 0
    # Modules imported before anything is built: where user code registers its own
    # scores and datasets (e.g. --config.imports=my_project.scores).
    c.imports = ()
    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # the evaluated model's (set from it)
    c.model.options = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict()
    # In-distribution dataset by registered name (ood_jax.data.available_datasets()).
    c.data.dataset = "cifar10"
    # "tfds", "local" (the offline files in $OOD_JAX_DATA_DIR or ../shared/data), or a
    # folder holding <dataset>_{train,test}.npz or {train,test}/<class>/ images.
    c.data.source = _DATA[name]["source"]
    c.data.train_limit = _DATA[name]["train_limit"]
    c.data.test_limit = _DATA[name]["test_limit"]
    c.data.eval_batch_size = _DATA[name]["eval_batch_size"]
    c.train = ml_collections.ConfigDict()
    # JAX's persistent compilation cache: "" = $OOD_JAX_COMPILATION_CACHE, else
    # <user cache>/ood_jax/jax; "off" = none; or a folder.
    c.train.compilation_cache = ""
    # TensorBoard event files beside the report (<report folder>/../tensorboard/eval).
    c.train.tensorboard = True
    c.eval = section(name)
    return c
