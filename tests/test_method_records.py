"""One home per training method: each ``experiments/methods/<name>.py`` holds its whole
record, every record is listed, and no per-method table lives anywhere else."""

import ast
import importlib
import importlib.util
import pathlib

import pytest

from experiments import methods
from experiments.configs import default
from ood_jax import scores
from ood_jax.train import get_objective

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "experiments" / "methods"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "base"))


def test_every_method_module_is_listed_once_in_the_commands_order():
    assert sorted(methods.METHODS) == MODULES
    assert methods.METHODS == ("logitnorm", "ce", "oe", "energy_ft", "ceda", "acet", "l2norm")
    with pytest.raises(ValueError, match="method must be one of"):
        methods.get("bogus")


@pytest.mark.parametrize("name", MODULES)
def test_each_record_is_complete(name):
    module = importlib.import_module(f"experiments.methods.{name}")
    record = module.METHOD
    assert isinstance(record, methods.Method) and methods.get(name) is record
    assert record.name == name and record.label
    objective = get_objective(record.objective)  # registered
    assert record.headline_score in scores.available_scores()
    assert record.fine_tuning in methods.FINE_TUNING
    # Trained on the (Tiny ImageNet) auxiliary outliers <=> near-auxiliary in the report.
    assert record.near_auxiliary == objective.uses_outliers
    # Its docstring: paper/recipe/command, the one --help prints; the entry point is thin.
    assert record.doc == module.__doc__ and f"python -m experiments.cifar10_{name}" in record.doc
    entry = ROOT / "experiments" / f"cifar10_{name}.py"
    command = importlib.import_module(f"experiments.cifar10_{name}")
    assert command.__doc__.splitlines()[0] == record.doc.splitlines()[0]
    assert f'main(sys.argv[1:], method="{name}")' in entry.read_text()
    assert record.presets[: len(default.PRESETS)] == default.PRESETS
    for preset in record.presets:
        for finetune in (False, True):
            config = methods.get_config(name, preset, finetune=finetune)
            assert (config.method, config.preset) == (name, preset)
            if preset in default.PRESETS:
                assert config.objective.name == record.objective
    for flag in record.flags:
        assert flag.name in objective.defaults and flag.help


def test_study_entries_are_the_study_order():
    studied = {m for m in methods.METHODS if methods.get(m).study is not None}
    assert sorted(methods.STUDY_ORDER) == sorted(studied)
    for name in methods.STUDY_ORDER:
        study = methods.get(name).study
        assert study.seeds >= 1
        if study.init_from is not None:
            # fine-tunes a from-scratch study run of the same seed
            base = methods.get(study.init_from).study
            assert base.init_from is None and base.seeds >= study.seeds
            assert methods.get(name).fine_tuning != "none"


# Tables keyed by method that used to live outside experiments/methods/.
FORMER_TABLES = (
    "_OBJECTIVE",
    "FINETUNE_METHODS",
    "METHOD_NAMES",
    "HEADLINE",
    "NEAR_AUXILIARY_METHODS",
    "ACET_TRAIN_STEPS",
)


def _assigned_names(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign | ast.AnnAssign)
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }


def test_no_per_method_table_outside_the_methods_package():
    assert importlib.util.find_spec("experiments.configs.methods") is None
    for path in (ROOT / "experiments").rglob("*.py"):
        if PACKAGE in path.parents:
            continue
        found = _assigned_names(path) & set(FORMER_TABLES)
        assert not found, (path, found)
    plan = (ROOT / "experiments" / "study" / "plan.py").read_text()
    assert "SEEDS = {" not in plan and '"acet"' not in plan
    # The runner reads a method's flags and fine-tuning rule from its record.
    train = (ROOT / "experiments" / "train.py").read_text()
    assert "energy_ft" not in train and "m_in" not in train
