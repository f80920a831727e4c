"""docs/own-model.md runs as written: its Python blocks, in order, in one namespace.

The page trains a Flax NNX model that returns its logits only and a Flax linen model
outside the library, on 2,000 CIFAR-10 (JPEG) training images, and evaluates both with
``evaluate_model``. The checks below are what the page promises: every detector each
model can serve is computed (decided here from the scores' declared needs and the
models' layers, not read back from the run), each other one skipped with a warning,
and the linen model's features are its ``classifier`` layer's input (recomputed with
linen's own ``capture_intermediates``).
"""

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from ood_jax.scores import available_scores, get_score

PAGE = Path(__file__).resolve().parents[1] / "docs" / "own-model.md"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not (DATA / "cifar10_train.npz").is_file():
        pytest.fail(f"the offline CIFAR-10 files are missing from {DATA}")
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("own_model"))
    old = os.environ.get("OOD_JAX_DATA_DIR")
    os.environ["OOD_JAX_DATA_DIR"] = str(DATA)
    namespace: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for block in python_blocks(PAGE.read_text()):
                exec(compile(block, str(PAGE), "exec"), namespace)
        namespace["_warnings"] = [str(w.message) for w in caught]
        namespace["_dir"] = Path(os.getcwd())
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("OOD_JAX_DATA_DIR", None)
        else:
            os.environ["OOD_JAX_DATA_DIR"] = old
    return namespace


def test_page_has_the_examples():
    assert len(python_blocks(PAGE.read_text())) >= 4


def expected(caps: set) -> list[str]:
    return sorted(n for n in available_scores() if set(get_score(n).needs) <= caps)


def test_every_class_in_the_limited_subset(page):
    assert np.bincount(page["train"].labels, minlength=10).min() > 100


def test_nnx_logits_only_gets_every_detector_it_can_serve(page):
    results = page["nnx_results"]
    # Logits only, one dropout layer of rate 0.2.
    assert sorted(results["scores"]) == expected({"dropout"})
    assert "mc_dropout" in results["scores"] and "odin" in results["scores"]
    skipped = [n for n in available_scores() if n not in results["scores"]]
    assert sorted(results["skipped_scores"]) == sorted(skipped)
    for name in skipped:
        assert any(f"skipping {name!r}" in w for w in page["_warnings"]), name
    report = (page["_dir"] / "reports" / "nnx_logits_only" / "results.md").read_text()
    assert "- model: SmallCNN (Flax NNX)" in report and "skipped" in report


def test_linen_with_its_head_named(page):
    results = page["linen_results"]
    assert sorted(results["scores"]) == expected({"features", "head"})
    assert results["classification"]["accuracy"] > 0.2  # better than chance (0.1)
    # The features are the classifier's input: recompute ||z|| with linen's own record.
    module, variables, test = page["linen_module"], page["linen_variables"], page["test"]
    _, state = module.apply(variables, test.images.astype(np.float32), capture_intermediates=True)
    hidden = np.maximum(np.asarray(state["intermediates"]["hidden"]["__call__"][0]), 0)
    scores = np.load(page["_dir"] / "reports" / "linen_head" / "scores.npz")
    np.testing.assert_allclose(scores["id/feature_norm"], np.linalg.norm(hidden, axis=1), rtol=1e-4)
    full = results["ood"]["full"]["metrics"]
    assert {"tinyimagenet_crop", "textures_partial", "gaussian"} <= set(full["mahalanobis"])
