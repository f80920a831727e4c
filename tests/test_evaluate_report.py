"""run_evaluation end to end on a tiny trained model: numbers, report files, atomicity."""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from ood_jax import data as D
from ood_jax import sharding
from ood_jax.evaluate import EvalSpec, markdown_report, run_evaluation
from ood_jax.evaluate import plots as plots_module
from ood_jax.models import create_model

K = 3
BUILTIN_SCORES = (
    "msp",
    "max_logit",
    "energy",
    "neg_entropy",
    "feature_norm",
    "odin",
    "gradnorm",
    "mahalanobis",
    "knn",
    "gmm",
    "react",
    "mahalanobis_l2",
    "gmm_l2",
)
COLORS = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220]], np.float64)


def _colored(n, seed):
    """Class c = noisy images around colour c: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, n)
    images = COLORS[labels][:, None, None, :] + rng.normal(0, 30, (n, 32, 32, 3))
    images = np.clip(images, 0, 255).astype(np.uint8)
    return D.from_arrays(images, labels, name="colors", num_classes=K, source=f"test seed {seed}")


@pytest.fixture(scope="module")
def trained():
    model = create_model("tiny", num_classes=K, width=4, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    train = _colored(256, seed=1)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            logits, _ = model(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    images = D.normalize(train.images)
    for i in range(40):
        sl = slice((i * 64) % 256, (i * 64) % 256 + 64)
        step(model, optimizer, images[sl], train.labels[sl])
    model.eval()
    return model, train


@pytest.fixture(scope="module")
def report(trained, tmp_path_factory):
    model, train = trained
    workdir = tmp_path_factory.mktemp("run")
    rows = [{"step": s, "logit_norm": 1.0 + s} for s in (10, 20, 30)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    id_test = _colored(120, seed=2)
    ood = {"gaussian": D.make_gaussian_noise(50, seed=3), "blobs": D.make_blobs(40, seed=4)}
    out_dir = workdir / "eval"
    spec = EvalSpec(
        scores=BUILTIN_SCORES,
        score_hparams={
            "msp": {"temperature": (1.0, 100.0)},
            "energy": {"temperature": (1.0, 100.0)},
            "knn": {"k": 5},
            "odin": {"temperature": 100.0},
        },
        num_draws=3,
        batch_size=64,
        plot_scores=["msp", "odin", "knn"],  # every plot kind, fewer PNGs: keeps the test fast
    )
    results = run_evaluation(
        model,
        spec,
        id_test=id_test,
        ood_sets=ood,
        train=train,
        out_dir=out_dir,
        metrics_log_dir=workdir,
        metadata={"checkpoint": {"workdir": str(workdir), "step": 40}, "model": {"name": "tiny"}},
    )
    return results, out_dir, id_test, ood


def _softmax(logits):
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_classification_numbers_match_independent_computation(trained, report):
    model, _ = trained
    results, _, id_test, _ = report
    logits = np.asarray(model(D.normalize(id_test.images))[0], np.float64)
    conf, pred = _softmax(logits).max(1), logits.argmax(1)
    correct = pred == id_test.labels
    assert results["classification"]["accuracy"] == pytest.approx(correct.mean())
    assert correct.mean() > 0.8  # the model did learn
    ece = 0.0
    for lo, hi in zip(np.linspace(0, 1, 16)[:-1], np.linspace(0, 1, 16)[1:], strict=True):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert results["classification"]["ece"] == pytest.approx(ece, abs=1e-5)


def test_full_protocol_auroc_matches_sklearn(trained, report):
    model, _ = trained
    results, _, id_test, ood = report
    msp = lambda ds: _softmax(np.asarray(model(D.normalize(ds.images))[0], np.float64)).max(1)
    id_msp = msp(id_test)
    for name, ds in ood.items():
        s = np.r_[id_msp, msp(ds)]
        y = np.r_[np.ones(len(id_test)), np.zeros(len(ds))]
        got = results["ood"]["full"]["metrics"]["msp"][name]["auroc"]["mean"]
        assert got == pytest.approx(roc_auc_score(y, s), abs=1e-4)
    # Every example's scores are saved next to the report.
    saved = np.load(report[1] / "scores.npz")
    np.testing.assert_allclose(saved["id/msp"], id_msp, rtol=1e-5)
    for name, ds in ood.items():
        np.testing.assert_allclose(saved[f"ood/{name}/msp"], msp(ds), rtol=1e-5)
    np.testing.assert_array_equal(saved["id/labels"], id_test.labels)
    assert results["ood"]["papers"]["num_ood"] == 24  # 120 // 5
    assert results["ood"]["papers"]["draws"]["blobs"]["seeds"][2] == [0, zlib.crc32(b"blobs"), 2]


def test_report_files_are_complete_and_consistent(report):
    results, out_dir, _, _ = report
    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["complete"] is True and on_disk["checkpoint"]["step"] == 40
    expected = {"msp", "msp_T100", "energy", "energy_T100", "max_logit", "neg_entropy"}
    expected |= {"feature_norm", "odin", "gradnorm", "mahalanobis", "knn", "gmm", "react"}
    expected |= {"mahalanobis_l2", "gmm_l2"}
    assert set(on_disk["scores"]) == expected
    # The spec is stored as-is: the given scores in order, the resolved settings.
    assert on_disk["spec"]["scores"] == list(BUILTIN_SCORES) and on_disk["spec"]["num_draws"] == 3
    assert on_disk["spec"]["score_hparams"] == on_disk["score_hparams"]
    assert on_disk["spec"]["score_hparams"]["knn"]["k"] == 5
    for rel in on_disk["plots"]:
        assert (out_dir / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    names = {os.path.basename(p) for p in on_disk["plots"]}
    assert {"reliability.png", "feature_norm.png", "cos_pred.png", "logit_norm.png"} <= names
    assert {"hist_odin.png", "roc_knn.png"} <= names
    md = (out_dir / "results.md").read_text()
    avg = results["ood"]["papers"]["metrics"]["energy"]["average"]
    cells = [f"{100 * avg[m]['mean']:.2f}" for m in ("fpr95", "auroc", "aupr_in")]
    assert "| Energy | " + " | ".join(cells) in md  # the summary row
    assert "| **Average** |" in md and "cos(z, w_pred)" in md
    # The distance split's total (float64) is the Mahalanobis score's distance (float32
    # through a whitener of an ill-conditioned covariance), per set.
    saved = np.load(out_dir / "scores.npz")
    split = on_disk["diagnostics"]["mahalanobis_split"]
    for name, key in (("colors", "id/mahalanobis"), ("gaussian", "ood/gaussian/mahalanobis")):
        median = np.median(-saved[key])
        assert split["raw"][name]["total"]["q50"] == pytest.approx(median, rel=5e-3), name
    for name, key in (("colors", "id/mahalanobis_l2"), ("blobs", "ood/blobs/mahalanobis_l2")):
        median = np.median(-saved[key])
        assert split["l2"][name]["total"]["q50"] == pytest.approx(median, rel=5e-3), name
    assert set(split["raw"]) == {"train", "colors", "gaussian", "blobs"}
    assert "raw total" in md
    noted = markdown_report({**results, "set_notes": {"blobs": "near-auxiliary"}})
    assert "| blobs (near-auxiliary) |" in noted and "| gaussian |" in noted
    assert not [p for p in os.listdir(out_dir.parent) if p.startswith(".eval.")]


def test_failed_step_leaves_no_report(trained, tmp_path, monkeypatch):
    model, train = trained
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    (out_dir / "results.json").write_text('{"old": true}')

    def broken(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(plots_module, "reliability_diagram", broken)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run_evaluation(
            model,
            EvalSpec(scores=["msp"], protocols=["full"]),
            id_test=_colored(40, seed=5),
            ood_sets={"gaussian": D.make_gaussian_noise(20, seed=6)},
            out_dir=out_dir,
        )
    # The previous report is untouched and no temporary directory is left behind.
    assert (out_dir / "results.json").read_text() == '{"old": true}'
    assert os.listdir(tmp_path) == ["eval"]


def test_bad_input_raises(trained):
    model, _ = trained
    id_test = _colored(20, seed=7)
    noise = {"gaussian": D.make_gaussian_noise(10, seed=8)}
    msp = EvalSpec(scores=["msp"])
    with pytest.raises(ValueError, match="no OOD sets"):
        run_evaluation(model, msp, id_test=id_test, ood_sets={})
    with pytest.raises(ValueError, match="pass train="):
        run_evaluation(model, EvalSpec(scores=["knn"]), id_test=id_test, ood_sets=noise)
    with pytest.raises(ValueError, match="labelled"):
        run_evaluation(model, msp, id_test=noise["gaussian"], ood_sets=noise)
    with pytest.raises(ValueError, match="same name"):
        run_evaluation(model, msp, id_test=id_test, ood_sets={"colors": id_test})


def test_importing_and_plotting_leave_matplotlib_backend_alone(tmp_path):
    # A notebook's inline backend must survive `import ood_jax.evaluate` and a report.
    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import numpy as np\n"
        "import ood_jax.evaluate\n"
        "from ood_jax.evaluate import plots\n"
        "plots.roc_curves(np.arange(5.0), {'a': np.arange(3.0)}, "
        f"{str(tmp_path / 'roc.png')!r}, score_name='x')\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_mmc_and_the_adversarial_noise_set(trained):
    from ood_jax.evaluate import ForwardPass
    from ood_jax.evaluate.adversarial import NAME, adversarial_noise
    from ood_jax.evaluate.protocol import dataset_seeds

    model, _ = trained
    mean, std = np.asarray(D.CIFAR10_MEAN), np.asarray(D.CIFAR10_STD)
    attacked = adversarial_noise(
        ForwardPass(model), 12, seed=3, mean=mean, std=std, eps=0.05, steps=4, batch_size=8
    )
    # The documented start: uniform noise from default_rng([seed, crc32(name)]).
    start = np.random.default_rng(dataset_seeds(3, NAME)).uniform(0, 1, (12, 32, 32, 3))
    pixels = attacked.images * std + mean
    assert np.abs(pixels - start).max() <= 0.05 + 1e-5
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    conf = lambda x: _softmax(np.asarray(model(x.astype(np.float32))[0], np.float64)).max(1)
    assert conf(attacked.images).mean() > conf((start - mean) / std).mean()

    id_test = _colored(40, seed=9)
    spec = EvalSpec(
        scores=["msp"],
        protocols=["full"],
        seed=3,
        adversarial_noise=12,
        attack_steps=4,
        attack_eps=0.05,
        batch_size=8,
    )
    results = run_evaluation(
        model, spec, id_test=id_test, ood_sets={"gaussian": D.make_gaussian_noise(20, seed=6)}
    )
    assert results["mmc"][NAME] == pytest.approx(conf(attacked.images).mean(), rel=1e-5)
    assert results["mmc"]["colors"] == pytest.approx(conf(D.normalize(id_test.images)).mean())
    assert results["data"]["ood"][NAME]["num_examples"] == 12
    assert "attacked" in results["data"]["ood"][NAME]["source"]


def test_the_chunked_attack_equals_one_call_of_pgd(trained, monkeypatch):
    # The adversarial-noise set runs PGD in chunks of steps (memory); the result must
    # be the attack of one pgd_confidence call on the same batch and key.
    import jax

    from ood_jax import attacks
    from ood_jax.evaluate import ForwardPass
    from ood_jax.evaluate import adversarial as A

    model, _ = trained
    mean, std = np.asarray(D.CIFAR10_MEAN, np.float32), np.asarray(D.CIFAR10_STD, np.float32)
    monkeypatch.setattr(A, "CHUNK_STEPS", 3)  # 7 steps = 3 + 3 + 1
    chunked = A.adversarial_noise(
        ForwardPass(model, mesh=sharding.make_mesh(1)),
        8,
        seed=5,
        mean=mean,
        std=std,
        eps=0.1,
        steps=7,
        batch_size=8,
    )
    rng = np.random.default_rng(A.dataset_seeds(5, A.NAME))
    noise = rng.uniform(0.0, 1.0, (8, 32, 32, 3)).astype(np.float32)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(int(rng.integers(2**31))), 0))
    whole = attacks.pgd_confidence(
        lambda u: model((u - mean) / std)[0], noise, key, eps=0.1, steps=7
    )
    np.testing.assert_allclose(chunked.images, (np.asarray(whole) - mean) / std, atol=1e-5)


def test_a_killed_evaluations_temporary_folder_is_removed_by_the_next(tmp_path):
    from ood_jax.evaluate import atomic_directory

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = tmp_path / f".eval.tmp-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "results.json").write_text("{}")
    live = tmp_path / f".eval.tmp-{os.getpid()}-xyz"  # a running writer's: kept
    live.mkdir()
    with atomic_directory(str(tmp_path / "eval")) as tmp:
        (tmp_path / "marker").write_text(tmp)
    assert not stale.exists() and live.exists() and (tmp_path / "eval").is_dir()


def test_histogram_ranges_ignore_a_few_extreme_values():
    # 1,000 Mahalanobis-like scores near -50 and three at -1500: the bins must cover
    # the bulk, not stretch to -1500 (which left the bulk in two or three bins).
    rng = np.random.default_rng(0)
    bulk = rng.normal(-50.0, 5.0, 1000)
    values = np.r_[bulk, [-1500.0, -1400.0, -1300.0]]
    edges = plots_module.robust_edges(values, bins=40)
    pooled = np.sort(values)
    lo, hi = np.quantile(pooled, [0.005, 0.995])  # the central 99%, by NumPy directly
    assert edges[0] == pytest.approx(lo) and edges[-1] == pytest.approx(hi)
    counts, _ = np.histogram(np.clip(bulk, lo, hi), bins=edges)
    assert (counts > 0).sum() >= 30  # the bulk spreads over most bins
    shown, outside = plots_module.clipped(values, edges)
    assert outside == int(np.sum((values < lo) | (values > hi))) and outside >= 3
    assert shown.min() == pytest.approx(lo)
