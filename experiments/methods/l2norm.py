"""L2 feature normalization (Haas et al., TMLR 2023): ``python -m experiments.cifar10_l2norm``.

ResNet-18 with spectral normalization, leaky ReLU and global average pooling;
the penultimate features are L2-normalized in training only, and their norm is
the OOD score at test time (``feature_norm`` in the report). ``paper``: 60
epochs, batch 1024, SGD lr 0.1 x0.1 at epochs 40 and 50. ``cpu`` and ``smoke``:
the preset's model with the three options. ``--preset logitnorm_plus``:
LogitNorm with the same three model options (350 epochs, steps at 150 and 250,
batch 128), the paper's LogitNorm+::

    python -m experiments.cifar10_l2norm --workdir runs/l2 --preset cpu --data local
"""

import ml_collections

from experiments.methods.base import Method, StudyRuns

MODEL_OPTIONS = {"spectral_norm": True, "activation": "leaky_relu", "pooling": "avg"}


def recipe(c: ml_collections.ConfigDict, preset: str, finetune: bool) -> None:
    options = dict(c.model.options.to_dict())
    options.update(MODEL_OPTIONS)
    if preset in ("paper", "logitnorm_plus"):
        c.model.name = "resnet18"
        options = dict(MODEL_OPTIONS)
        c.optim.schedule = "step"
        c.optim.nesterov = False
        if preset == "paper":
            # Haas et al.: 60 epochs, lr 0.1 x0.1 at 40 and 50, batch 1024.
            c.train.epochs = 60
            c.optim.boundaries_epochs = (40, 50)
            c.train.batch_size = 1024
        else:
            c.objective.name = "logitnorm"
            c.train.epochs = 350
            c.optim.boundaries_epochs = (150, 250)
            c.train.batch_size = 128
    c.model.options = ml_collections.ConfigDict(options)


METHOD = Method(
    name="l2norm",
    label="L2 feature norm",
    objective="feature_norm",
    headline_score="feature_norm",
    doc=__doc__,
    recipe=recipe,
    extra_presets={"logitnorm_plus": "paper"},
    study=StudyRuns(seeds=3),
)
