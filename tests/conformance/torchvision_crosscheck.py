"""Full-size torchvision ResNets against their ood_jax conversions (outside CI).

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy
    /tmp/tv/bin/python tests/conformance/torchvision_crosscheck.py /tmp/tvx     # torch side: files
    python tests/conformance/torchvision_crosscheck.py /tmp/tvx --compare         # ood_jax side

The committed fixtures (tests/fixtures/torch) are reduced-width models written from
the torchvision source; this checks the real ``torchvision.models.resnet18`` and
``resnet50`` (ImageNet stem, 10 classes, BatchNorm statistics randomized) on random
224x224 inputs, eval mode, against ``ood_jax.interop.load_torch``.
"""

import os
import sys

import numpy as np


def write(folder: str) -> None:
    import torch
    import torchvision
    from torch_models import randomize_batch_norm

    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    for name in ("resnet18", "resnet50"):
        model = randomize_batch_norm(getattr(torchvision.models, name)(num_classes=10).eval())
        with torch.no_grad():
            logits = model(x).numpy()
        torch.save(model.state_dict(), os.path.join(folder, f"{name}.pt"))
        np.savez(os.path.join(folder, f"{name}.npz"), x=x.numpy(), logits=logits)
        print(name, "written;", torch.__version__, torchvision.__version__)


def compare(folder: str) -> None:
    from ood_jax import interop

    for name in ("resnet18", "resnet50"):
        ref = np.load(os.path.join(folder, f"{name}.npz"))
        model, _ = interop.load_torch(os.path.join(folder, f"{name}.pt"), f"torchvision_{name}")
        logits, _ = model(np.transpose(ref["x"], (0, 2, 3, 1)))
        diff = np.abs(np.asarray(logits) - ref["logits"]).max()
        scale = np.abs(ref["logits"]).max()
        print(f"{name}: max |diff| {diff:.3g}, relative to max |logit| {diff / scale:.3g}")


if __name__ == "__main__":
    (compare if "--compare" in sys.argv else write)(sys.argv[1])
