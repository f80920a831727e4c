"""Published checkpoints: export/load round trip, hash and name errors, and every
checkpoint committed in the repository reproduces its recorded test accuracy."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from ood_jax import data as D
from ood_jax import pretrained, sharding
from ood_jax.evaluate import ForwardPass
from ood_jax.evaluate.stages import classification_summary, compute_outputs
from ood_jax.models import create_model
from ood_jax.train.state import split_model

IDENTITY = {"name": "tiny", "num_classes": 10, "options": {"width": 8, "dropout_rate": 0.0}}


def test_export_then_load_gives_the_same_model(tmp_path):
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(3), width=8, dropout_rate=0.0)
    model_def, params, batch_stats = split_model(model)
    # Non-default statistics, so a load that kept fresh ones would differ.
    batch_stats = jax.tree.map(lambda x: x + 0.25, batch_stats)
    entry = {"model": IDENTITY, "dataset": "cifar10", "test_accuracy": 0.5}
    written = pretrained.export(
        tmp_path, "toy/tiny/ce/seed0", params=params, batch_stats=batch_stats, entry=entry
    )
    assert written["file"] == "toy/tiny/ce/seed0.npz"
    assert pretrained.available(tmp_path) == ["toy/tiny/ce/seed0"]
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    reference = model_def.merge(params, batch_stats, train=False, key=None)(images)[0]
    loaded = pretrained.load("toy/tiny/ce/seed0", root=tmp_path)
    np.testing.assert_array_equal(np.asarray(loaded(images)[0]), np.asarray(reference))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["toy/tiny/ce/seed0"]["sha256"] == pretrained.sha256_file(
        tmp_path / "toy" / "tiny" / "ce" / "seed0.npz"
    )

    with pytest.raises(ValueError, match=r"unknown published checkpoint.*Did you mean"):
        pretrained.load("toy/tiny/ce/seed1", root=tmp_path)
    path = tmp_path / written["file"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="SHA-256 .* the manifest says"):
        pretrained.load("toy/tiny/ce/seed0", root=tmp_path)
    with pytest.raises(pretrained.PretrainedError, match="manifest.json missing"):
        pretrained.available(tmp_path / "nowhere")


def test_a_file_of_another_model_is_a_clear_error(tmp_path):
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(0), width=8, dropout_rate=0.0)
    _, params, batch_stats = split_model(model)
    other = {**IDENTITY, "options": {"width": 16, "dropout_rate": 0.0}}
    pretrained.export(tmp_path, "x", params=params, batch_stats=batch_stats, entry={"model": other})
    with pytest.raises(ValueError, match="has shape .* the model expects"):
        pretrained.load("x", root=tmp_path)


def test_several_folders_search_like_path(tmp_path, monkeypatch):
    # $OOD_JAX_PRETRAINED may list several folders; each name loads from its own folder.
    models = {}
    for folder, seed in (("a", 1), ("b", 2)):
        model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(seed), width=8, dropout_rate=0.0)
        model_def, params, batch_stats = split_model(model)
        pretrained.export(
            tmp_path / folder,
            f"toy/{folder}",
            params=params,
            batch_stats=batch_stats,
            entry={"model": IDENTITY},
        )
        models[folder] = model_def.merge(params, batch_stats, train=False, key=None)
    monkeypatch.setenv(pretrained.ENV, os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    assert pretrained.available() == ["toy/a", "toy/b"]
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    for folder in ("a", "b"):
        got = pretrained.load(f"toy/{folder}")(images)[0]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(models[folder](images)[0]))
    # root= still means that one folder.
    assert pretrained.available(tmp_path / "b") == ["toy/b"]
    # The same name in two folders is ambiguous: refused, naming both.
    (tmp_path / "b" / "manifest.json").write_text((tmp_path / "a" / "manifest.json").read_text())
    with pytest.raises(pretrained.PretrainedError, match="is in both .*a and .*b"):
        pretrained.available()
    # A folder listed twice counts once; one without a manifest is named as listed.
    a = str(tmp_path / "a")
    monkeypatch.setenv(pretrained.ENV, os.pathsep.join([a, a + os.sep, os.path.relpath(a)]))
    assert pretrained.available() == ["toy/a"]
    monkeypatch.setenv(pretrained.ENV, os.pathsep.join([a, str(tmp_path / "none")]))
    with pytest.raises(pretrained.PretrainedError, match=r"none \(manifest.json missing\), listed"):
        pretrained.available()
    monkeypatch.setenv(pretrained.ENV, os.pathsep)
    with pytest.raises(pretrained.PretrainedError, match="no folder of published checkpoints"):
        pretrained.available()


def _published():
    try:
        return pretrained.available()
    except pretrained.PretrainedError:
        return []


PUBLISHED = _published()


def test_the_repository_publishes_checkpoints():
    # The parametrized test below must not be empty (an empty parametrize is skipped).
    assert PUBLISHED, f"no manifest under {pretrained.default_roots()}"


@pytest.mark.slow
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_checkpoint_reproduces_its_test_accuracy(name):
    entry = pretrained.info(name)
    model = pretrained.load(name)
    test = D.load_dataset(entry["dataset"], "test")
    norm = entry["normalization"]
    forward = ForwardPass(model, mesh=sharding.make_mesh(1))
    batch = entry["eval_batch_size"]

    def batches(ds):
        return D.eval_batches(
            ds,
            batch_size=batch,
            process_index=0,
            process_count=1,
            mean=norm["mean"],
            std=norm["std"],
        )

    outputs = compute_outputs(forward, {"test": test}, batches=batches)["test"]
    summary = classification_summary(outputs)
    assert len(outputs.labels) == entry["test_examples"]
    assert summary["accuracy"] == entry["test_accuracy"], name
