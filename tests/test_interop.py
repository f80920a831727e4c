"""PyTorch checkpoints in (ood_jax.interop, experiments.torch_import); no torch needed.

The golden fixtures in tests/fixtures/torch/ were written by
tests/conformance/torch_fixtures.py with torch 2.13: reduced-width copies of each
architecture in the authors' key layout, with random BatchNorm statistics, and
PyTorch's eval-mode logits and features on random and real CIFAR-10 inputs.
"""

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import torch_import
from experiments.cli import UsageError
from ood_jax import interop
from ood_jax.models import create_model

FIXTURES = Path(__file__).parent / "fixtures" / "torch"
# The reduced widths tests/conformance/torch_fixtures.py builds (same depth and key names).
SMALL_OPTIONS = {
    "wrn40_2": {"base_width": 2},
    "resnet18_32x32": {"widths": (2, 4, 8, 16)},
    "resnet18_cifar": {"widths": (2, 4, 8, 16)},
    "torchvision_resnet18": {"widths": (2, 4, 8, 16)},
    "torchvision_resnet50": {"widths": (2, 4, 8, 16)},
    "densenet100": {"growth_rate": 2},
}


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(FIXTURES / "golden.npz"))


def _jit_forward(model):
    graph, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graph, s)(x)), state


def _assert_close(actual, expected):
    # 1e-5 relative to the outputs' scale: float32 convolutions sum in a different
    # order in XLA and in PyTorch's CPU kernels.
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", interop.ARCH_NAMES)
def test_converted_models_match_pytorch(arch, golden):
    model, info = interop.load_torch(FIXTURES / f"{arch}.pt", arch, options=SMALL_OPTIONS[arch])
    assert info["identity"]["num_classes"] == 10  # read from the head
    assert info["provenance"]["format"] == "zip"
    forward, state = _jit_forward(model)
    random, cifar = golden[f"{arch}/random/inputs"], golden["cifar/inputs"]
    # One batch (one compile) where the sides agree; torchvision's random inputs are 37x37.
    batches = (
        [random, cifar]
        if random.shape[2:] != cifar.shape[2:]
        else [np.concatenate([random, cifar])]
    )
    outputs = [forward(state, x.transpose(0, 2, 3, 1)) for x in batches]  # NCHW -> NHWC
    logits, features = (np.concatenate([np.asarray(o[i]) for o in outputs]) for i in (0, 1))
    for name, actual in (("logits", logits), ("features", features)):
        expected = [golden[f"{arch}/{kind}/{name}"] for kind in ("random", "cifar")]
        _assert_close(actual[: len(random)], expected[0])
        _assert_close(actual[len(random) :], expected[1])
    # Not a constant: the outputs differ between inputs and classes.
    assert np.std(golden[f"{arch}/cifar/logits"]) > 1e-3


@pytest.mark.parametrize("arch", interop.ARCH_NAMES)
def test_safetensors_hold_the_same_arrays(arch):
    from_pickle, _ = interop.read_state_dict(FIXTURES / f"{arch}.pt")
    from_safetensors, info = interop.read_state_dict(FIXTURES / f"{arch}.safetensors")
    assert info["format"] == "safetensors"
    assert sorted(from_safetensors) == sorted(from_pickle)
    for key, value in from_pickle.items():
        np.testing.assert_array_equal(from_safetensors[key], value)


def test_legacy_layout_and_wrapped_checkpoints_read_like_plain_ones():
    plain, _ = interop.read_state_dict(FIXTURES / "wrn40_2.pt")
    legacy, info = interop.read_state_dict(FIXTURES / "wrn40_2_legacy.pt")
    assert info["format"] == "legacy"
    assert list(legacy) == list(plain)
    for key in plain:
        np.testing.assert_array_equal(legacy[key], plain[key])
    # kuangliu's main.py under DataParallel: {"net": {"module.conv1.weight": ...}, "acc", "epoch"}.
    plain, _ = interop.read_state_dict(FIXTURES / "resnet18_cifar.pt")
    wrapped, info = interop.read_state_dict(FIXTURES / "resnet18_cifar_wrapped.pt")
    assert list(wrapped) == list(plain)
    assert (
        info["sha256"]
        == hashlib.sha256((FIXTURES / "resnet18_cifar_wrapped.pt").read_bytes()).hexdigest()
    )
    np.testing.assert_array_equal(
        wrapped["layer4.1.bn2.running_var"], plain["layer4.1.bn2.running_var"]
    )
    # First BatchNorm of the fixture: num_batches_tracked as the script set it.
    assert plain["bn1.num_batches_tracked"].dtype == np.int64
    assert int(plain["bn1.num_batches_tracked"]) == 39100


def test_unwrap_lightning_and_openood_layouts():
    w = np.ones((2, 3), np.float32)
    lightning = {"epoch": 3, "state_dict": {"model.fc.weight": w, "model.fc.bias": w[0]}}
    assert list(interop.unwrap_state_dict(lightning)) == ["fc.weight", "fc.bias"]
    compiled = {"model_state_dict": {"module._orig_mod.fc.weight": w}, "optimizer": {}}
    assert list(interop.unwrap_state_dict(compiled)) == ["fc.weight"]
    assert list(interop.unwrap_state_dict({"fc.weight": w})) == ["fc.weight"]  # OpenOOD best.ckpt
    # A prefix only some keys share stays.
    assert sorted(interop.unwrap_state_dict({"module.a": w, "b": w})) == ["b", "module.a"]
    with pytest.raises(interop.CheckpointFormatError, match="'epoch' is a int"):
        interop.unwrap_state_dict({"fc.weight": w, "epoch": 3})
    with pytest.raises(interop.CheckpointFormatError, match="holds a list"):
        interop.unwrap_state_dict([w])


class _RunsCode:
    """What a malicious checkpoint pickles: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_checkpoint(pickle_bytes: bytes, storages: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        for key, raw in storages.items():
            archive.writestr(f"archive/data/{key}", raw)
    return buffer.getvalue()


def test_malicious_pickles_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"state_dict": {"conv1.weight": _RunsCode(marker)}}, protocol=2)
    pickle.loads(payload)  # the payload is live: plain pickle runs it ...
    assert marker.exists()
    marker.unlink()
    for name, raw in (("legacy.pt", payload), ("zip.pt", _zip_checkpoint(payload, {}))):
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(
            interop.UnsafeCheckpointError, match=r"posix\.system.*nothing .* was run"
        ):
            interop.read_state_dict(path)
        assert not marker.exists()  # ... ours refuses before calling anything
    with pytest.raises(UsageError, match=r"posix\.system"):
        torch_import.load_for_evaluation(tmp_path / "zip.pt", "wrn40_2")
    assert not marker.exists()


def _tensor_pickle(size: int, stride: int, offset: int) -> bytes:
    """A pickle of ``_rebuild_tensor_v2(4-float storage, offset, (size,), (stride,))``, by hand."""

    def text(s: str) -> bytes:
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    storage = (
        b"(" + text("storage") + b"ctorch\nFloatStorage\n" + text("0") + text("cpu") + b"K\x04tQ"
    )
    args = (
        storage
        + b"K"
        + bytes([offset])
        + b"K"
        + bytes([size])
        + b"\x85K"
        + bytes([stride])
        + b"\x85"
    )
    args += b"\x89ccollections\nOrderedDict\n)R"
    tensor = b"ctorch._utils\n_rebuild_tensor_v2\n(" + args + b"tR"
    return b"\x80\x02}(" + text("w") + tensor + b"u."


def test_tensor_views_are_checked_against_their_storage(tmp_path):
    data = np.arange(4, dtype="<f4").tobytes()
    path = tmp_path / "view.pt"
    path.write_bytes(_zip_checkpoint(_tensor_pickle(size=2, stride=2, offset=1), {"0": data}))
    state_dict, _ = interop.read_state_dict(path)
    np.testing.assert_array_equal(state_dict["w"], [1.0, 3.0])  # elements 1 and 3
    path.write_bytes(_zip_checkpoint(_tensor_pickle(size=3, stride=2, offset=0), {"0": data}))
    with pytest.raises(
        interop.UnsafeCheckpointError, match="reaches element 4, past the storage's 4"
    ):
        interop.read_state_dict(path)
    path.write_bytes(_zip_checkpoint(_tensor_pickle(size=2, stride=1, offset=0), {"0": data[:8]}))
    with pytest.raises(interop.UnsafeCheckpointError, match="holds 8 bytes, expected 4 x 4"):
        interop.read_state_dict(path)


@pytest.fixture(scope="module")
def wrn_state():
    return interop.read_state_dict(FIXTURES / "wrn40_2.pt")[0]


def test_strict_errors_name_the_first_bad_key(wrn_state):
    small = SMALL_OPTIONS["wrn40_2"]
    missing = {k: v for k, v in wrn_state.items() if k != "block2.layer.0.convShortcut.weight"}
    with pytest.raises(
        interop.StateDictMismatchError, match="missing key 'block2.layer.0.convShortcut.weight'"
    ):
        interop.convert_state_dict(missing, "wrn40_2", options=small)
    extra = {**wrn_state, "block3.layer.6.conv1.weight": wrn_state["conv1.weight"]}
    with pytest.raises(
        interop.StateDictMismatchError, match="unexpected key 'block3.layer.6.conv1.weight'"
    ):
        interop.convert_state_dict(extra, "wrn40_2", options=small)
    with pytest.raises(interop.StateDictMismatchError, match=r"'fc.weight' has shape \(10, 16\)"):
        interop.convert_state_dict(wrn_state, "wrn40_2", num_classes=7, options=small)
    with pytest.raises(
        interop.StateDictMismatchError,
        match=r"'block1.layer.0.bn1.weight' has shape \(2,\).* model's \(16,\)",
    ):
        interop.convert_state_dict(wrn_state, "wrn40_2")  # full width
    with pytest.raises(interop.StateDictMismatchError, match="missing key 'block1.layer.6.bn1"):
        interop.convert_state_dict(wrn_state, "densenet100", options=SMALL_OPTIONS["densenet100"])
    with pytest.raises(ValueError, match="unknown architecture 'wrn28_10'"):
        interop.convert_state_dict(wrn_state, "wrn28_10")


def test_a_failed_load_leaves_the_model_untouched(wrn_state):
    model, _ = interop.convert_state_dict(wrn_state, "wrn40_2", options=SMALL_OPTIONS["wrn40_2"])
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param, nnx.BatchStat))
    bad = {**wrn_state, "fc.bias": np.zeros(3, np.float32)}  # the head comes last
    bad = {k: v + 1 if k != "fc.bias" else v for k, v in bad.items()}
    with pytest.raises(interop.StateDictMismatchError, match="'fc.bias'"):
        interop.load_state_dict(model, bad, interop.get_architecture("wrn40_2"))
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param, nnx.BatchStat))
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_conversion_layouts(wrn_state):
    model, _ = interop.convert_state_dict(wrn_state, "wrn40_2", options=SMALL_OPTIONS["wrn40_2"])
    conv = wrn_state["block1.layer.0.conv1.weight"]  # OIHW [out, in, kh, kw]
    kernel = np.asarray(model.blocks[0].conv1.kernel[...])  # HWIO
    assert kernel[2, 0, 1, 3] == conv[3, 1, 2, 0]
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), wrn_state["fc.weight"].T)
    bn = model.blocks[7].bn2  # block2.layer.1
    np.testing.assert_array_equal(
        np.asarray(bn.var[...]), wrn_state["block2.layer.1.bn2.running_var"]
    )
    np.testing.assert_array_equal(np.asarray(bn.scale[...]), wrn_state["block2.layer.1.bn2.weight"])
    assert bn.epsilon == 1e-5


@pytest.mark.parametrize(
    "name, classes, count",
    [  # PyTorch's sum(p.numel() for p in model.parameters()) at full width
        ("resnet18_imagenet", 1000, 11_689_512),  # torchvision resnet18()
        ("resnet50_imagenet", 1000, 25_557_032),  # torchvision resnet50()
        ("densenet100", 10, 769_162),  # DenseNet3(100, 10), tests/conformance/torch_fixtures.py
    ],
)
def test_new_models_have_pytorchs_parameter_counts(name, classes, count):
    model = nnx.eval_shape(lambda: create_model(name, num_classes=classes, rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == count


def test_parse_normalization():
    assert torch_import.parse_normalization("imagenet") == (
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    assert torch_import.parse_normalization("0.5,0.25") == ((0.5,) * 3, (0.25,) * 3)
    assert torch_import.parse_normalization("0.1,0.2,0.3,1,2,3") == (
        (0.1, 0.2, 0.3),
        (1.0, 2.0, 3.0),
    )
    for bad in ("cifar100", "0.5", "1,2,3", "a,b"):
        with pytest.raises(
            UsageError, match="cifar10, openood_cifar10, kuangliu_cifar10, imagenet"
        ):
            torch_import.parse_normalization(bad)
    with pytest.raises(UsageError, match="must be > 0"):
        torch_import.parse_normalization("0.5,0")


def test_load_for_evaluation_and_its_errors(tmp_path):
    imported = torch_import.load_for_evaluation(
        FIXTURES / "resnet18_32x32.safetensors",
        "resnet18_32x32",
        options=SMALL_OPTIONS["resnet18_32x32"],
    )
    assert imported.mean == (0.4914, 0.4822, 0.4465)  # OpenOOD's, the architecture's default
    assert imported.provenance["normalization"] == "openood_cifar10"
    assert imported.provenance["arch"] == "resnet18_32x32"
    assert imported.identity == {
        "name": "resnet18",
        "num_classes": 10,
        "options": {"widths": (2, 4, 8, 16)},
    }
    with pytest.raises(UsageError, match="--arch 'resnet20'.*wrn40_2"):
        torch_import.load_for_evaluation(FIXTURES / "wrn40_2.pt", "resnet20")
    with pytest.raises(UsageError, match="no PyTorch checkpoint at"):
        torch_import.load_for_evaluation(tmp_path / "absent.pt", "wrn40_2")
    with pytest.raises(UsageError, match="as --arch resnet18_cifar: missing key 'linear.weight'"):
        torch_import.load_for_evaluation(FIXTURES / "resnet18_32x32.pt", "resnet18_cifar")


def test_initial_weights_picks_the_architecture_that_fits():
    assert torch_import.is_torch_checkpoint("snapshots/cifar10_wrn_pretrained_epoch_99.pt")
    assert not torch_import.is_torch_checkpoint("runs/ce")
    identity = {"name": "resnet18", "num_classes": 10, "options": {"widths": (2, 4, 8, 16)}}
    params, batch_stats, step = torch_import.initial_weights(
        FIXTURES / "resnet18_cifar.pt", identity
    )
    assert step == 0
    state, _ = interop.read_state_dict(FIXTURES / "resnet18_cifar.pt")
    np.testing.assert_array_equal(np.asarray(params["head"]["bias"][...]), state["linear.bias"])
    np.testing.assert_array_equal(
        np.asarray(batch_stats["bn1"]["mean"][...]), state["bn1.running_mean"]
    )
    with pytest.raises(
        UsageError,
        match="as resnet18_32x32: missing key 'fc.weight'.*as resnet18_cifar: .* has shape",
    ):
        torch_import.initial_weights(FIXTURES / "resnet18_cifar.pt", {**identity, "options": {}})
    with pytest.raises(UsageError, match="no PyTorch architecture converts to 'resnet9'"):
        torch_import.initial_weights(
            FIXTURES / "resnet18_cifar.pt", {**identity, "name": "resnet9"}
        )


def test_options_that_change_the_structure_are_refused(wrn_state):
    with pytest.raises(
        interop.StateDictMismatchError, match="module blocks.0.conv1.conv has no place"
    ):
        interop.convert_state_dict(
            wrn_state, "wrn40_2", options={"base_width": 2, "spectral_norm": True}
        )


def test_imported_model_through_the_evaluation_pipeline(golden):
    """Real CIFAR-10 test images through ood_jax's own decode, normalization and forward pass."""
    from ood_jax import data
    from ood_jax.evaluate import ForwardPass

    imported = torch_import.load_for_evaluation(
        FIXTURES / "resnet18_cifar_wrapped.pt",
        "resnet18_cifar",
        normalization="openood_cifar10",  # what tests/conformance/torch_fixtures.py normalized with
        options=SMALL_OPTIONS["resnet18_cifar"],
    )
    # The fixture writer's images: the test split's first four.
    first = data.load_dataset("cifar10_jpeg", "test")
    images = data.ImageDataset(
        first.images[:4], first.labels[:4], name="cifar10_jpeg", num_classes=10
    )
    batches = data.eval_batches(images, batch_size=4, mean=imported.mean, std=imported.std)
    outputs = ForwardPass(imported.model)(batches)
    _assert_close(outputs.logits, golden["resnet18_cifar/cifar/logits"])
    _assert_close(outputs.features, golden["resnet18_cifar/cifar/features"])


def test_max_pool_pads_with_minus_infinity_like_pytorch():
    from ood_jax.models.resnet import max_pool_3x3_stride2

    x = -1.0 - np.random.default_rng(0).random((2, 7, 6, 3), dtype=np.float32)  # all negative
    expected = np.zeros((2, 4, 3, 3), np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    for i in range(4):  # PyTorch MaxPool2d(3, stride=2, padding=1): floor((7 + 2 - 3) / 2) + 1
        for j in range(3):
            expected[:, i, j] = padded[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2))
    np.testing.assert_array_equal(np.asarray(max_pool_3x3_stride2(x)), expected)
