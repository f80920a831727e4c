"""Evaluation presets (experiments/configs/eval_presets.py): what the training presets,
``experiments.evaluate --eval_preset`` and a PyTorch file's report take their settings from."""

import json

import pytest
from test_evaluate_cli import user_error

from experiments import evaluate as cli
from experiments import methods
from experiments.configs import default, eval_presets
from experiments.evaluation import report_config
from experiments.run_config import parse, resolve

# The training presets' eval sections as they were spelled out in
# experiments/configs/default.py before the evaluation presets existed: the settings of
# every method's runs, which naming an evaluation preset must leave exactly as they were.
_COMMON = {
    "ood": True,
    "ood_sets": [],
    "scores": [],
    "protocols": ["papers", "full"],
    "convention": "hendrycks",
    "num_draws": 10,
    "num_synthetic": 2000,
    "max_train": 10000,
    "max_ood": 0,
    "force": False,
    "adversarial_noise": 2000,
    "attack_steps": 40,
    "attack_eps": 0.3,
    "score_hparams": {},
    "tune": [],
    "tune_ood": "tinyimagenet_train:train",
    "tune_grids": {},
    "val_size": 1000,
    "fit_on_val": [],
}
TRAINING_EVAL = {
    "paper": _COMMON,
    "cpu": {
        **_COMMON,
        "ood_sets": [
            "tinyimagenet_crop",
            "tinyimagenet_resize",
            "textures_partial",
            "gaussian",
            "uniform",
            "rademacher",
            "blobs",
            "lowpass_uniform",
            "permuted_pixels",
        ],
        "adversarial_noise": 1000,
        "score_hparams": {"knn": {"max_train": 10000}},
    },
    "smoke": {
        **_COMMON,
        "ood": False,
        "ood_sets": ["gaussian", "uniform"],
        "max_train": 512,
        "adversarial_noise": 64,
        "attack_steps": 5,
    },
}


def _json(config) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def _each_method_preset():
    for method in methods.METHODS:
        for preset in methods.presets_of(method):
            for finetune in (False, True):
                yield method, preset, finetune


def test_every_training_preset_keeps_its_eval_settings():
    for method, preset, finetune in _each_method_preset():
        config = methods.get_config(method, preset, finetune=finetune)
        base = methods.get(method).extra_presets.get(preset, preset)
        assert _json(config.eval) == TRAINING_EVAL[base], (method, preset, finetune)


def test_each_training_preset_names_its_evaluation_preset():
    assert set(default.EVAL_PRESET) == set(default.PRESETS)
    for preset in default.PRESETS:
        named = _json(eval_presets.section(default.EVAL_PRESET[preset]))
        own = {"ood": False} if preset == "smoke" else {}  # smoke's report is off
        assert _json(default.get_config(preset).eval) == {**named, **own}


def test_a_pytorch_file_and_a_training_run_of_a_preset_get_one_spec():
    """The resolved settings of a model without a run (a PyTorch file) at an evaluation
    preset are those of a training run at the same-named preset."""
    for name in eval_presets.EVAL_PRESETS:
        run = resolve(parse(methods.get_config("ce", name), ["--config.eval.ood=true"]))
        config = report_config(eval_presets.get_config(name), data=None, overrides=[])
        config.model.name = run.config.model.name  # the imported model's, in the command
        alone = resolve(config)
        assert alone.eval == run.eval and alone.ood_sets == run.ood_sets, name
        assert "objective" not in alone.config and "optim" not in alone.config
        data = ("source", "train_limit", "test_limit", "eval_batch_size")
        assert [alone.config.data[k] for k in data] == [run.config.data[k] for k in data]


def test_unknown_presets_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown evaluation preset 'tpu'; known: paper, cpu"):
        eval_presets.section("tpu")
    with pytest.raises(ValueError, match="unknown evaluation preset"):
        eval_presets.get_config("tpu")
    # Before any file is read: the workdir need not exist.
    err = user_error(capsys, [f"--workdir={tmp_path / 'absent'}", "--eval_preset=tpu"])
    assert err == "error: --eval_preset 'tpu': unknown evaluation preset; known: paper|cpu|smoke."
    err = user_error(capsys, ["--torch_checkpoint=absent.pt", "--arch=wrn40_2", "--preset=cpu"])
    assert "--preset 'cpu': an evaluation's settings are chosen with --eval_preset" in err


def test_eval_preset_replaces_a_runs_eval_settings_and_keeps_its_data(monkeypatch, tmp_path):
    saved = methods.get_config("logitnorm", "cpu").to_dict()
    saved["eval"]["max_ood"] = 123  # the run's own setting, replaced by the preset's
    saved["data"]["test_limit"] = 77  # the run's data, kept
    metadata = {"config": json.loads(json.dumps(saved))}
    monkeypatch.setattr(cli, "restore_model", lambda workdir, step=None: (None, metadata, 4))
    seen = []
    monkeypatch.setattr(
        cli, "report_from_settings", lambda settings, *a, **k: seen.append(settings)
    )

    cli.evaluate_workdir(
        str(tmp_path), eval_preset="smoke", overrides=["--config.eval.num_draws=3"]
    )
    cli.evaluate_workdir(str(tmp_path))
    smoke, own = seen
    expected = {**TRAINING_EVAL["smoke"], "ood": True, "num_draws": 3}
    filled = ("score_hparams", "tune_grids")  # completed from the registries
    assert {k: v for k, v in _json(smoke.config.eval).items() if k not in filled} == {
        k: v for k, v in expected.items() if k not in filled
    }
    assert smoke.ood_sets == ("gaussian", "uniform") and smoke.eval.max_train == 512
    assert smoke.config.data.test_limit == 77 and smoke.config.model.name == "resnet9"
    # Without --eval_preset: the run's own settings.
    assert own.config.eval.max_ood == 123 and own.eval.max_ood == 123
    assert own.ood_sets == tuple(TRAINING_EVAL["cpu"]["ood_sets"])
