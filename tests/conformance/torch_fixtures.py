"""Write the golden PyTorch fixtures that tests/test_interop.py converts and compares.

Run with torch in its own venv (torch is never an ood_jax dependency):

    python3 -m venv /work/torch_venv
    /work/torch_venv/bin/pip install torch==2.13.0 numpy safetensors pillow
    /work/torch_venv/bin/python tests/conformance/torch_fixtures.py

For each architecture it builds a reduced-width instance with the authors' key
layout (same depth and module names, fewer channels), draws non-trivial
BatchNorm statistics and affine parameters, and saves under tests/fixtures/torch/:
``<arch>.pt`` (zip layout), ``<arch>.safetensors``, and in ``golden.npz`` the
inputs (random NCHW images and real CIFAR-10 test images normalized with the
CIFAR-10 mean/std) with PyTorch's eval-mode logits and penultimate features
(the head's input). ``wrn40_2_legacy.pt`` is the WRN in the pre-1.6 layout the
papers' 2018-2019 checkpoints use; ``resnet18_cifar_wrapped.pt`` wraps the
kuangliu ResNet the way its ``main.py`` under DataParallel saves it
(``{"net": {"module.*": ...}, "acc", "epoch"}``).

The model definitions follow the authors' code (hendrycks/outlier-exposure
``wrn.py``, OpenOOD ``resnet18_32x32.py``, kuangliu/pytorch-cifar
``resnet.py``, torchvision ``resnet.py``, deep_Mahalanobis_detector ``densenet.py``), with a
width argument added.
"""

import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch_models import BasicBlock  # kuangliu's block; this script runs from tests/conformance/

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "fixtures" / "torch"
CIFAR = ROOT.parent / "shared" / "data" / "cifar10_test.npz"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# --- hendrycks/outlier-exposure CIFAR/models/wrn.py ---
class WRNBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.droprate = drop_rate
        self.equalInOut = in_planes == out_planes
        # As the authors write it (keys: convShortcut.weight where the width changes).
        shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        self.convShortcut = (not self.equalInOut) and shortcut or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class NetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride, drop_rate):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                WRNBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(nb_layers)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, num_classes, widen_factor=1, drop_rate=0.0, base=16):
        super().__init__()
        ch = [base, base * widen_factor, 2 * base * widen_factor, 4 * base * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]

    def features(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return F.avg_pool2d(out, 8).view(-1, self.nChannels)


# --- kuangliu/pytorch-cifar models/resnet.py; OpenOOD resnet18_32x32.py (head "fc") ---
class CifarResNet18(nn.Module):
    def __init__(self, num_classes, widths, head):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        for i, (w, s) in enumerate(zip(widths, (1, 2, 2, 2), strict=True)):
            blocks = [BasicBlock(self.in_planes, w, s), BasicBlock(w, w, 1)]
            self.in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.add_module(head, nn.Linear(widths[3], num_classes))

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


# --- torchvision/models/resnet.py (v1.5) ---
class TVBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class TVResNet(nn.Module):
    def __init__(self, block, layers, num_classes, widths):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i, (w, n) in enumerate(zip(widths, layers, strict=True)):
            self.add_module(f"layer{i + 1}", self._make_layer(block, w, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


# --- deep_Mahalanobis_detector models/densenet.py (DenseNet3, bottleneck, reduction 0.5) ---
class BottleneckBlock(nn.Module):
    def __init__(self, in_planes, out_planes):
        super().__init__()
        inter = out_planes * 4
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, inter, 1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.conv2 = nn.Conv2d(inter, out_planes, 3, stride=1, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([x, out], 1)


class TransitionBlock(nn.Module):
    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 1, stride=1, padding=0, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class DenseBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, growth_rate):
        super().__init__()
        self.layer = nn.Sequential(
            *[BottleneckBlock(in_planes + i * growth_rate, growth_rate) for i in range(nb_layers)]
        )

    def forward(self, x):
        return self.layer(x)


class DenseNet3(nn.Module):
    def __init__(self, depth, num_classes, growth_rate=12, reduction=0.5):
        super().__init__()
        in_planes = 2 * growth_rate
        n = int((depth - 4) / 3 / 2)
        self.conv1 = nn.Conv2d(3, in_planes, 3, stride=1, padding=1, bias=False)
        self.block1 = DenseBlock(n, in_planes, growth_rate)
        in_planes = int(in_planes + n * growth_rate)
        self.trans1 = TransitionBlock(in_planes, int(math.floor(in_planes * reduction)))
        in_planes = int(math.floor(in_planes * reduction))
        self.block2 = DenseBlock(n, in_planes, growth_rate)
        in_planes = int(in_planes + n * growth_rate)
        self.trans2 = TransitionBlock(in_planes, int(math.floor(in_planes * reduction)))
        in_planes = int(math.floor(in_planes * reduction))
        self.block3 = DenseBlock(n, in_planes, growth_rate)
        in_planes = int(in_planes + n * growth_rate)
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(in_planes, num_classes)
        self.in_planes = in_planes

    def features(self, x):
        out = self.trans1(self.block1(self.conv1(x)))
        out = self.block3(self.trans2(self.block2(out)))
        out = self.relu(self.bn1(out))
        return F.avg_pool2d(out, 8).view(-1, self.in_planes)


SMALL = (2, 4, 8, 16)
# arch name -> (builder, head's name, side of the random images: odd exercises stride-2 padding).
FIXTURES = {
    "wrn40_2": (lambda: WideResNet(40, 10, widen_factor=2, drop_rate=0.3, base=2), "fc", 32),
    "resnet18_32x32": (lambda: CifarResNet18(10, SMALL, head="fc"), "fc", 32),
    "resnet18_cifar": (lambda: CifarResNet18(10, SMALL, head="linear"), "linear", 32),
    "torchvision_resnet18": (lambda: TVResNet(TVBasicBlock, (2, 2, 2, 2), 10, SMALL), "fc", 37),
    "torchvision_resnet50": (lambda: TVResNet(TVBottleneck, (3, 4, 6, 3), 10, SMALL), "fc", 37),
    "densenet100": (lambda: DenseNet3(100, 10, growth_rate=2), "fc", 32),
}


def randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, head bias not zero."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=gen))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
                m.num_batches_tracked.fill_(391 * 100)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(0.1 * torch.randn(m.out_features, generator=gen))


def cifar_images(count: int) -> np.ndarray:
    data = np.load(CIFAR)
    images = [
        np.asarray(
            Image.open(
                io.BytesIO(data["encoded"][data["offsets"][i] : data["offsets"][i + 1]].tobytes())
            )
        )
        for i in range(count)
    ]
    x = np.stack(images).astype(np.float32) / 255.0
    x = (x - np.float32(CIFAR_MEAN)) / np.float32(CIFAR_STD)
    return x.transpose(0, 3, 1, 2).astype(np.float32)  # NCHW


def main() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    golden = {"cifar/inputs": cifar_images(4)}
    for arch, (build, head, side) in FIXTURES.items():
        model = build()
        randomize(model, gen)
        model.eval()
        state = model.state_dict()
        torch.save(state, OUT / f"{arch}.pt")
        save_file({k: v.contiguous() for k, v in state.items()}, str(OUT / f"{arch}.safetensors"))
        golden[f"{arch}/random/inputs"] = torch.randn(3, 3, side, side, generator=gen).numpy()
        with torch.no_grad():
            for kind in ("random", "cifar"):
                x = golden[f"{arch}/random/inputs" if kind == "random" else "cifar/inputs"]
                features = model.features(torch.from_numpy(x))
                golden[f"{arch}/{kind}/features"] = features.numpy()
                golden[f"{arch}/{kind}/logits"] = getattr(model, head)(features).numpy()
        if arch == "wrn40_2":
            torch.save(state, OUT / "wrn40_2_legacy.pt", _use_new_zipfile_serialization=False)
        if arch == "resnet18_cifar":  # what kuangliu's main.py saves, under DataParallel
            wrapped = {
                "net": {f"module.{k}": v for k, v in state.items()},
                "acc": 95.1,
                "epoch": 199,
            }
            torch.save(wrapped, OUT / "resnet18_cifar_wrapped.pt")
        params = sum(p.numel() for p in model.parameters())
        print(f"{arch}: {len(state)} keys, {params} parameters")
    np.savez_compressed(OUT / "golden.npz", **golden)


if __name__ == "__main__":
    main()
