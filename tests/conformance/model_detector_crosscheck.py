"""Cross-check of the detectors that need the model against OpenOOD v1.5 and pytorch-ood 0.4.

A kuangliu ResNet-18 (``tests/conformance/torch_models.py``, the ``resnet18_cifar`` interop
architecture; random weights, BatchNorm statistics randomized) scores the same images in
PyTorch (the references) and, converted by ``ood_jax.interop.load_torch``, in ood_jax
(through the evaluation's ``fit_captured`` / ``fit_scores`` / ``score_images`` /
``score_activations``). OpenOOD's postprocessors get a stand-in of its ``ResNet18_32x32``
(the same forward, ``intermediate_forward``, ``layer4``, ``fc``, ``avgpool``). The table
gives, per detector and reference, the largest difference relative to the score's spread,
the rank correlation and both AUROCs (ID vs OOD images).

    python tests/conformance/model_detector_crosscheck.py --torch_python /work/ood_venv/bin/python \
        --openood_src /work/openood_src --out tests/conformance/results/model_detector_crosscheck.md
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from detector_crosscheck import (
    TABLE_HEADER,
    _import_pytorch_ood,
    _openood_modules,
    comparison_row,
    openood_postprocessor,
)

N_TRAIN, N_TEST, SIZE, K = 800, 100, 16, 10
# The normalization's std (the preprocessing step is eps / std): OpenOOD's MDSEns divides by
# a fixed 0.5, so 0.5 here lets every reference see the same step.
STD = (0.5, 0.5, 0.5)
EPS, NOISE = 0.002, 0.0014
# (ood_jax score, hyperparameter overrides, reference key, what the reference computes)
CASES = [
    ("rankfeat", {}, "pytorch-ood/RankFeat", "block-4 RankFeat (its backbone: layer 4)"),
    ("rankfeat_fused", {}, "OpenOOD/rankfeat", "blocks 3 + 4"),
    ("mahalanobis_odin", {"eps": EPS}, "pytorch-ood/MahalanobisODIN", "norm_std = std"),
    ("mds_ensemble", {"noise": NOISE}, "OpenOOD/mds_ensemble", "5 layers, mean, alpha 1"),
    ("mds_ensemble_0", {"noise": 0.0}, "pytorch-ood/MultiMahalanobis", "no preprocessing"),
    ("gram", {"holdout": 0.0}, "pytorch-ood/Gram", "validation_fraction 0, / max softmax"),
]


def make_images(seed: int = 0) -> dict[str, np.ndarray]:
    """Normalized images: a class colour plus noise (ID), noise of another scale (OOD)."""
    rng = np.random.default_rng(seed)
    colours = rng.normal(0.0, 1.0, (K, 1, 1, 3))
    train_y = np.arange(N_TRAIN) % K
    test_y = rng.integers(0, K, N_TEST)

    def draw(labels, scale):
        return colours[labels] + rng.normal(0.0, scale, (len(labels), SIZE, SIZE, 3))

    ood = rng.normal(0.0, 1.5, (N_TEST, SIZE, SIZE, 3))
    test = np.concatenate([draw(test_y, 0.7), ood])
    return {
        "train_x": draw(train_y, 0.7).astype(np.float32),
        "train_y": train_y.astype(np.int64),
        "test_x": test.astype(np.float32),
    }


# ---------------------------------------------------------------- references (torch venv)


def _torch_model(torch):
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_models import ResNet18, randomize_batch_norm

    torch.manual_seed(0)
    return randomize_batch_norm(ResNet18(num_classes=K).eval())


def _openood_net(model, torch):
    """OpenOOD's ResNet18_32x32 interface on the kuangliu modules (the same forward)."""
    F = torch.nn.functional

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m, self.layer4, self.fc = model, model.layer4, model.linear
            self.avgpool = torch.nn.AdaptiveAvgPool2d(1)

        def blocks(self, x):
            out = [F.relu(self.m.bn1(self.m.conv1(x)))]
            for layer in (self.m.layer1, self.m.layer2, self.m.layer3, self.m.layer4):
                out.append(layer(out[-1]))
            return out

        def forward(self, x, return_feature=False, return_feature_list=False):
            feats = self.blocks(x)
            feats[-1] = self.avgpool(feats[-1])
            logits = self.fc(torch.flatten(feats[-1], 1))
            if return_feature:
                return logits, torch.flatten(feats[-1], 1)
            return (logits, feats) if return_feature_list else logits

        def intermediate_forward(self, x, layer_index):
            return self.blocks(x)[layer_index]

    return Net().eval()


def run_references(folder: str, openood_src: str) -> None:
    import torch

    a = dict(np.load(f"{folder}/images.npz"))
    model = _torch_model(torch)
    torch.save(model.state_dict(), f"{folder}/resnet18.pt")
    net = _openood_net(model, torch)
    nchw = {k: torch.from_numpy(a[k].transpose(0, 3, 1, 2).copy()) for k in ("train_x", "test_x")}
    train_y, test = torch.from_numpy(a["train_y"]), nchw["test_x"]
    detector = _import_pytorch_ood()
    stem = torch.nn.Sequential(model.conv1, model.bn1, torch.nn.ReLU())
    layers = [stem, model.layer1, model.layer2, model.layer3, model.layer4]
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), model.linear)
    out = {}
    with torch.no_grad():
        train_feats = [nchw["train_x"]]
        for layer in layers:
            train_feats.append(layer(train_feats[-1]))
        train_feats = train_feats[1:]
        test_feats = net.blocks(test)
        conf = net(test).softmax(dim=1).max(dim=1).values
        rank = detector.RankFeat(backbone=lambda x: net.blocks(x)[-1], head=head)
        out["pytorch-ood/RankFeat"] = -rank.predict(test)
        # Its fit takes the features as given (its predict takes the spatial mean itself).
        means = [f.mean(dim=(2, 3)) for f in train_feats]
        multi = detector.MultiMahalanobis(layers).fit_structured(means, train_y)
        out["pytorch-ood/MultiMahalanobis"] = -multi.predict_structured(test_feats)
        gram = detector.Gram(head, layers, num_classes=K, num_poles_list=[1, 2, 3, 4, 5])
        gram.validation_fraction = 0.0
        gram.fit(
            [(nchw["train_x"][i : i + 100], train_y[i : i + 100]) for i in range(0, N_TRAIN, 100)]
        )
        out["pytorch-ood/Gram"] = -gram.predict_structured(net(test), test_feats) / conf
    odin = detector.MahalanobisODIN(lambda x: net(x, return_feature=True)[1], eps=EPS, norm_std=STD)
    with torch.no_grad():
        odin.fit_features(net(nchw["train_x"], return_feature=True)[1], train_y)
    out["pytorch-ood/MahalanobisODIN"] = -odin.predict(test).detach()
    _openood_modules(Path(openood_src), torch)
    torch.cuda.FloatTensor = torch.FloatTensor  # mds_ensemble's alpha; no CUDA here
    loader = [
        {
            "data": nchw["train_x"][i : i + 100],
            "data_aux": nchw["train_x"][i : i + 100],
            "label": train_y[i : i + 100],
        }
        for i in range(0, N_TRAIN, 100)
    ]
    for file, args in (
        ("rankfeat", {"accelerate": False, "temperature": 1}),
        (
            "mds_ensemble",
            {
                "noise": NOISE,
                "feature_type_list": ["mean"] * 5,
                "alpha_list": [1] * 5,
                "reduce_dim_list": ["none"] * 5,
            },
        ),
    ):
        post = openood_postprocessor(file, args)
        post.setup(net, {"train": loader}, {})
        out[f"OpenOOD/{file}"] = post.postprocess(net, test)[1]
    np.savez(
        f"{folder}/refs.npz", **{k: np.asarray(v.detach(), np.float64) for k, v in out.items()}
    )


# ---------------------------------------------------------------- ood_jax (project venv)


def ood_jax_scores(folder: str, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    from ood_jax import data as D
    from ood_jax.evaluate import ForwardPass, fit_captured, fit_scores, score_images
    from ood_jax.evaluate.scoring import score_activations
    from ood_jax.interop import load_torch
    from ood_jax.scores import resolve_hparams

    model, _ = load_torch(f"{folder}/resnet18.pt", "resnet18_cifar")
    forward = ForwardPass(model)

    def batches(x, y):
        for i in range(0, len(x), 100):
            yield {
                "image": x[i : i + 100],
                "label": y[i : i + 100],
                "mask": np.ones(len(x[i : i + 100]), bool),
            }

    train_y = a["train_y"].astype(np.int32)
    test_y = -np.ones(len(a["test_x"]), np.int32)
    train = forward(batches(a["train_x"], train_y))
    stand_in = D.make_gaussian_noise(len(a["test_x"]), seed=0)  # the batches are given below
    out = {}
    for key, overrides, _, _ in CASES:
        name = key.removesuffix("_0")
        hp = resolve_hparams([name], {name: overrides})
        fitted = fit_scores(hp, train) | fit_captured(
            hp, forward, lambda: batches(a["train_x"], train_y)
        )
        test = lambda _: batches(a["test_x"], test_y)  # noqa: E731
        scored = score_images(
            hp, forward, {"test": stand_in}, batches=test, std=STD, seed=0, fitted=fitted
        )[0]["test"]
        scored |= score_activations(hp, forward, {"test": None}, batches=test, fitted=fitted)[
            "test"
        ]
        out[key] = scored[name]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch_python", help="a Python with torch and pytorch-ood 0.4")
    parser.add_argument(
        "--openood_src", required=True, help="folder holding openood/postprocessors"
    )
    parser.add_argument("--out", default="tests/conformance/results/model_detector_crosscheck.md")
    parser.add_argument("--reference", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        run_references(args.reference, args.openood_src)
        return
    a = make_images()
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/images.npz", **a)
        command = [
            args.torch_python,
            __file__,
            "--reference",
            tmp,
            "--openood_src",
            args.openood_src,
        ]
        subprocess.run(command, check=True)
        refs = dict(np.load(f"{tmp}/refs.npz"))
        ours = ood_jax_scores(tmp, a)
    lines = list(TABLE_HEADER)
    for key, _, ref_key, note in CASES:
        lines.append(comparison_row(key, ref_key, ours[key], refs[ref_key]) + f" {note} |")
    lines[0] += " reference setting |"
    lines[1] += " --- |"
    header = (
        "# Cross-check of the detectors that need the model\n\n"
        f"`python tests/conformance/model_detector_crosscheck.py`: a random kuangliu ResNet-18 "
        f"(BatchNorm statistics randomized) in PyTorch and converted to ood_jax, {N_TRAIN} "
        f"training and {N_TEST} + {N_TEST} (ID + OOD) test images of {SIZE}x{SIZE}, K = {K}, "
        f"std {STD[0]}; references' outlier scores negated. `mds_ensemble_0` is `mds_ensemble` "
        "with `noise=0`. Differences are explained in `docs/detectors.md`.\n\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
