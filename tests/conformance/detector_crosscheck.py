"""Cross-check of ood_jax's post-hoc detectors against pytorch-ood 0.4 and OpenOOD v1.5.

The same arrays (training and test features, logits, labels, a linear head) go to
ood_jax's registry entries (through the evaluation's ``fit_scores`` / ``score_outputs``)
and to the references' fit/score code; the table gives, per detector and reference,
the largest difference relative to the score's spread and the ID-vs-OOD AUROC of both.

Torch never enters ood_jax's environment: the references run in a second Python (one
with torch and pytorch-ood, e.g. ``/work/ood_venv``) that this script calls on itself
with ``--reference``. OpenOOD is not a package on PyPI; pass a checkout's root
(the folder holding ``openood/postprocessors``) as ``--openood_src``; its
postprocessors are loaded one file at a time with ``.cuda()`` made a no-op and
faiss replaced by an exact NumPy inner-product search.

    python tests/conformance/detector_crosscheck.py --torch_python /work/ood_venv/bin/python \
        --openood_src /work/openood_src --out tests/conformance/results/detector_crosscheck.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

N_TRAIN, N_TEST, DIM, K = 2000, 500, 32, 10  # K = 10: OpenOOD's num_classes_dict["cifar10"]

# Class weights for WeightedEBO (VOS trains them): two negative ones, which the ReLU drops.
WEBO_WEIGHTS = (0.5, 1.0, 2.0, -1.0, 0.25, 1.5, 0.0, 3.0, -0.5, 1.0)

# (ood_jax score, hyperparameter overrides, pytorch-ood detector or None, OpenOOD postprocessor
# file or None, OpenOOD postprocessor_args): every reference's defaults matched to ours.
CASES = [
    ("fdbd", {}, "fDBD", "fdbd", {"distance_as_normalizer": True}),
    ("rmds", {}, "RMD", "rmds", {}),
    ("relation", {}, None, "relation", {"pow": 1}),
    ("vim", {"dim": 16}, "ViM", "vim", {"dim": 16}),
    ("residual", {"dim": 16}, None, "residual", {"dim": 16}),
    ("gen", {"m": 100}, "GEN", "gen", {"gamma": 0.1, "M": 100}),
    ("temp_scale", {}, "TemperatureScaling", None, {}),
    ("klm", {}, "KLMatching", "kl_matching", {}),
    ("nnguide", {"alpha": 1.0, "k": 100}, "NNGuide", "nnguide", {"alpha": 1.0, "K": 100}),
    ("nci", {"alpha": 1e-4}, "NCI", "nci", {"alpha": 1e-4}),
    ("she", {}, "SHE", "she", {"metric": "inner_product"}),
    ("dice", {"percentile": 90.0}, "DICE", "dice", {"p": 90}),
    ("vra", {}, None, "vra", {"percentile_low": 10, "percentile_high": 90}),
    ("lts", {}, "LTS", None, {}),
    ("pnml", {}, "PNML", None, {}),
    ("openmax", {}, "OpenMax", None, {}),  # OpenOOD's needs libMR
    ("weighted_energy", {"weights": WEBO_WEIGHTS}, "WeightedEBO", None, {}),
]


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Non-negative (post-ReLU) clustered features, a head fitted to them, ID and OOD test sets."""
    rng = np.random.default_rng(seed)
    centers = np.abs(rng.normal(0.0, 1.5, (K, DIM)))

    def draw(n, labels, scale):
        return np.maximum(centers[labels] + rng.normal(0.0, scale, (n, DIM)), 0.0)

    train_y = np.arange(N_TRAIN) % K
    train_z = draw(N_TRAIN, train_y, 0.8)
    onehot = np.eye(K)[train_y] * 6.0 - 3.0
    design = np.concatenate([train_z, np.ones((N_TRAIN, 1))], axis=1)
    solution = np.linalg.lstsq(design, onehot, rcond=None)[0]
    # Least squares alone gives classes' weights summing to ~0 (the targets' sum is constant):
    # W is then rank-deficient and ViM's origin -W^+ b lies at ~1e8. Noise makes it full rank.
    kernel, bias = solution[:-1] + rng.normal(0.0, 0.1, (DIM, K)), solution[-1]
    id_z = draw(N_TEST, rng.integers(0, K, N_TEST), 0.8)
    ood_z = np.maximum(rng.normal(0.8, 1.2, (N_TEST, DIM)), 0.0)
    arrays = {"train_z": train_z, "train_y": train_y, "kernel": kernel, "bias": bias}
    arrays |= {"test_z": np.concatenate([id_z, ood_z])}
    arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}
    arrays["train_f"] = arrays["train_z"] @ arrays["kernel"] + arrays["bias"]
    arrays["test_f"] = arrays["test_z"] @ arrays["kernel"] + arrays["bias"]
    return arrays


# ---------------------------------------------------------------- ood_jax (project venv)


def ood_jax_scores(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ood_jax.evaluate import ModelOutputs, fit_scores, score_outputs
    from ood_jax.scores import Head, resolve_hparams

    hparams = resolve_hparams([c[0] for c in CASES], {c[0]: c[1] for c in CASES})
    train = ModelOutputs(a["train_f"], a["train_z"], a["train_y"].astype(np.int32))
    test = ModelOutputs(a["test_f"], a["test_z"], -np.ones(len(a["test_z"]), np.int32))
    fitted = fit_scores(hparams, train)
    return score_outputs(hparams, {"test": test}, head=Head(a["kernel"], a["bias"]), fitted=fitted)[
        "test"
    ]


# ---------------------------------------------------------------- references (torch venv)


def _import_pytorch_ood():
    """pytorch_ood.detector without the package's torchvision-dependent datasets."""
    import importlib.util

    spec = importlib.util.find_spec("pytorch_ood")
    package = types.ModuleType("pytorch_ood")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["pytorch_ood"] = package
    from pytorch_ood import detector

    return detector


def pytorch_ood_scores(a, torch) -> dict[str, np.ndarray]:
    detector = _import_pytorch_ood()
    head = torch.nn.Linear(DIM, K)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(a["kernel"].T))
        head.bias.copy_(torch.from_numpy(a["bias"]))
    z, y = torch.from_numpy(a["train_z"]), torch.from_numpy(a["train_y"]).long()
    f = torch.from_numpy(a["train_f"])
    tz, tf = torch.from_numpy(a["test_z"]), torch.from_numpy(a["test_f"])
    w, b = head.weight.detach(), head.bias.detach()
    made = {
        "fDBD": lambda: detector.fDBD(None, head).fit_features(z).predict_features(tz),
        "RMD": lambda: detector.RMD(None).fit_features(z, y).predict_features(tz),
        "ViM": lambda: detector.ViM(None, d=16, w=w, b=b).fit_features(z, y).predict_features(tz),
        "GEN": lambda: detector.GEN(None, gamma=0.1, M=100).predict_logits(tf),
        "TemperatureScaling": lambda: (
            detector.TemperatureScaling(None).fit_logits(f, y).predict_logits(tf)
        ),
        "KLMatching": lambda: detector.KLMatching(None).fit_logits(f, y).predict_logits(tf),
        "NNGuide": lambda: (
            detector.NNGuide(None, head, k=100).fit_features(z, y).predict_features(tz)
        ),
        "NCI": lambda: detector.NCI(None, head, alpha=1e-4).fit_features(z).predict_features(tz),
        "SHE": lambda: detector.SHE(None, head).fit_features(z, y).predict_features(tz),
        "LTS": lambda: detector.LTS(None, head, p=0.05).predict_features(tz),
        "PNML": lambda: detector.PNML(None, head).fit_features(z, y).predict_features(tz),
        "OpenMax": lambda: (
            detector.OpenMax(None, tailsize=25, alpha=10, euclid_weight=1.0)
            .fit_logits(f, y)
            .predict_logits(tf)
        ),
        "WeightedEBO": lambda: detector.WeightedEBO(
            None, torch.tensor(WEBO_WEIGHTS)
        ).predict_logits(tf),
        "DICE": lambda: (
            detector.DICE(None, w=w, b=b, p=0.9).fit_features(z, y).predict_features(tz)
        ),
    }
    out = {}
    for name, run in made.items():
        out[name] = -run().detach().numpy().astype(np.float64)  # outlier score -> ours
    scaling = detector.TemperatureScaling(None).fit_logits(f, y)
    out["temperature"] = np.asarray(float(scaling.t))
    return out


def _openood_modules(src: Path, torch):
    """Loads OpenOOD's postprocessor files without its package imports (faiss, libmr, CUDA)."""
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    comm = types.ModuleType("openood.utils.comm")
    comm.is_main_process = lambda: True
    for name, module in {
        "openood": types.ModuleType("openood"),
        "openood.utils": types.ModuleType("openood.utils"),
        "openood.utils.comm": comm,
        "openood.postprocessors": types.ModuleType("openood.postprocessors"),
        "faiss": _numpy_faiss(),
    }.items():
        sys.modules.setdefault(name, module)
    sys.modules["openood"].__path__ = [str(src / "openood")]
    sys.modules["openood.postprocessors"].__path__ = [str(src / "openood" / "postprocessors")]


def _numpy_faiss():
    faiss = types.ModuleType("faiss")

    class IndexFlatIP:
        def __init__(self, dim):
            self.bank = np.zeros((0, dim), np.float32)

        def add(self, x):
            self.bank = np.concatenate([self.bank, np.asarray(x, np.float32)])

        def search(self, queries, k):
            sims = np.asarray(queries, np.float64) @ self.bank.T.astype(np.float64)
            order = np.argsort(-sims, axis=1)[:, :k]
            return np.take_along_axis(sims, order, axis=1), order

    faiss.IndexFlatIP = IndexFlatIP
    return faiss


def openood_postprocessor(file: str, args: dict):
    """OpenOOD's ``{file}_postprocessor.py`` class built on a CIFAR-10 config with ``args``
    (after :func:`_openood_modules`)."""
    import importlib

    module = importlib.import_module(f"openood.postprocessors.{file}_postprocessor")
    cls = next(
        v
        for k, v in vars(module).items()
        if k.endswith("Postprocessor") and k != "BasePostprocessor"
    )
    config = types.SimpleNamespace(
        dataset=types.SimpleNamespace(name="cifar10"),
        postprocessor=types.SimpleNamespace(
            postprocessor_args=types.SimpleNamespace(**args), postprocessor_sweep={}
        ),
    )
    return cls(config)


def openood_scores(a, torch, src: Path) -> dict[str, np.ndarray]:
    _openood_modules(src, torch)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(DIM, K)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(a["kernel"].T))
                self.fc.bias.copy_(torch.from_numpy(a["bias"]))

        def forward(self, x, return_feature=False):
            logits = self.fc(x)
            # A copy: OpenOOD's relation normalizes the features in place.
            return (logits, x.clone()) if return_feature else logits

        def get_fc(self):
            return self.fc.weight.detach().numpy(), self.fc.bias.detach().numpy()

    class Loader(list):
        batch_size = 100
        dataset = range(N_TRAIN)

    train = Loader(
        {
            "data": torch.from_numpy(a["train_z"][i : i + 100]),
            "label": torch.from_numpy(a["train_y"][i : i + 100]).long(),
        }
        for i in range(0, N_TRAIN, 100)
    )
    loaders = {"train": train, "val": train, "test": train}
    net, data = Net().eval(), torch.from_numpy(a["test_z"])
    out = {}
    for _, _, _, file, args in CASES:
        if file is None:
            continue
        post = openood_postprocessor(file, args)
        post.setup(net, loaders, {})
        with torch.no_grad():
            _, conf = post.postprocess(net, data)
        out[file] = np.asarray(conf, np.float64)
    return out


def run_references(arrays_path: str, out_path: str, openood_src: str | None) -> None:
    import torch

    torch.manual_seed(0)
    a = dict(np.load(arrays_path))
    out = {f"pytorch-ood/{k}": v for k, v in pytorch_ood_scores(a, torch).items()}
    if openood_src:
        out |= {f"OpenOOD/{k}": v for k, v in openood_scores(a, torch, Path(openood_src)).items()}
    np.savez(out_path, **out)


# ---------------------------------------------------------------- the table


def _auroc(scores: np.ndarray) -> float:
    """ID (first half) vs OOD (second half), higher = ID; ties count one half."""
    half = len(scores) // 2
    id_s, ood_s = scores[:half], scores[half:]
    greater = (id_s[:, None] > ood_s[None, :]).mean()
    return float(greater + 0.5 * (id_s[:, None] == ood_s[None, :]).mean())


TABLE_HEADER = [
    "| detector | reference | max abs diff / score range | Spearman rank correlation | "
    "AUROC ood_jax | AUROC reference |",
    "| --- | --- | --- | --- | --- | --- |",
]


def comparison_row(name: str, ref_key: str, mine: np.ndarray, ref: np.ndarray) -> str:
    """One table row: ours against a reference on the same examples (ID half, then OOD)."""
    from scipy.stats import spearmanr

    mine = np.asarray(mine, np.float64)
    spread = float(np.ptp(mine)) or 1.0
    rel = float(np.max(np.abs(mine - ref))) / spread
    rho = spearmanr(mine, ref).statistic
    return (
        f"| `{name}` | {ref_key} | {rel:.2e} | {rho:.6f} | {_auroc(mine):.6f} | {_auroc(ref):.6f} |"
    )


def table(ours: dict[str, np.ndarray], refs: dict[str, np.ndarray]) -> str:
    lines = list(TABLE_HEADER)
    for name, _, torch_name, file, _ in CASES:
        for ref_key in (f"pytorch-ood/{torch_name}", f"OpenOOD/{file}"):
            if ref_key in refs:
                lines.append(comparison_row(name, ref_key, ours[name], refs[ref_key]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_python", help="a Python with torch and pytorch-ood 0.4")
    parser.add_argument("--openood_src", help="folder holding openood/postprocessors")
    parser.add_argument("--out", default="tests/conformance/results/detector_crosscheck.md")
    parser.add_argument("--reference", nargs=2, metavar=("ARRAYS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        run_references(*args.reference, args.openood_src)
        return
    arrays = make_arrays()
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/arrays.npz", **arrays)
        command = [args.torch_python, __file__, "--reference", f"{tmp}/arrays.npz", f"{tmp}/r.npz"]
        if args.openood_src:
            command += ["--openood_src", args.openood_src]
        subprocess.run(command, check=True)
        refs = dict(np.load(f"{tmp}/r.npz"))
    report = table(ood_jax_scores(arrays), refs)
    from ood_jax.scores import fit_temperature

    fitted_t = float(fit_temperature(arrays["train_f"], arrays["train_y"]).temperature)
    report += (
        f"\n\nTemperature scaling: ood_jax's exact NLL minimum T = {fitted_t:.4f}; "
        f"pytorch-ood's 50 L-BFGS steps (lr 0.01, from T = 1) end at "
        f"T = {float(refs['pytorch-ood/temperature']):.4f}."
    )
    header = (
        "# Detector cross-check\n\n"
        f"`python tests/conformance/detector_crosscheck.py` on {N_TRAIN} training and "
        f"{N_TEST} + {N_TEST} (ID + OOD) test feature vectors, D = {DIM}, K = {K}, a "
        "least-squares head; references' outlier scores negated. Differences are "
        "explained in `docs/detectors.md`.\n\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + report + "\n")
    print(header + report)


if __name__ == "__main__":
    main()
