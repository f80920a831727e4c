"""Data on the device: placement, the steps' plans, and the batches made in the step.

Every check is against a NumPy reference written here (a slow loop for the crop and
flip, the documented permutation and draws for the plans) and against the host
pipeline's own batches, on 1 and on the 8 virtual CPU devices.
"""

import types

import jax
import numpy as np
import pytest

from ood_jax import data, sharding
from ood_jax.data import device

N = 103  # not a multiple of 8 devices: the last device's rows end in padding
MEAN = (0.1, 0.5, 0.9)
STD = (0.2, 0.3, 0.25)


@pytest.fixture(scope="module")
def dataset():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    return data.from_arrays(images, (np.arange(N) * 7) % 10, name="toy")


def slow_crop(image, top, left, flip):
    """The crop and flip of a 4-pixel zero-padded image, one pixel at a time."""
    out = np.zeros((32, 32, 3), np.uint8)
    for i in range(32):
        for j in range(32):
            r, c = top + i - 4, left + (31 - j if flip else j) - 4
            if 0 <= r < 32 and 0 <= c < 32:
                out[i, j] = image[r, c]
    return out


def slow_normalize(pixels, mean=MEAN, std=STD):
    """The host's two roundings, one value at a time in float32."""
    out = np.zeros(pixels.shape, np.float32)
    for c in range(3):
        scale = np.float32(1.0 / (255.0 * std[c]))
        offset = np.float32(-mean[c] / std[c])
        out[..., c] = pixels[..., c].astype(np.float32) * scale + offset
    return out


@pytest.mark.parametrize("method", device.CROP_METHODS)
def test_crop_flip_matches_the_slow_reference(method):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    # The corners and both flips, then random crops.
    crops = [(t, left, f) for t, left in ((0, 0), (8, 8), (0, 8), (8, 0), (4, 4)) for f in (0, 1)]
    crops += [tuple(rng.integers(0, 9, 2)) + (int(rng.integers(0, 2)),) for _ in range(10)]
    crops = np.asarray(crops, np.int32)
    got = np.asarray(jax.jit(device.crop_flip, static_argnums=2)(images, crops, method))
    for n, (top, left, flip) in enumerate(crops):
        np.testing.assert_array_equal(got[n], slow_crop(images[n], top, left, flip))
    np.testing.assert_array_equal(got[9], images[9, :, ::-1])  # centred, mirrored


@pytest.mark.parametrize("norm", [(MEAN, STD), (data.CIFAR10_MEAN, data.CIFAR10_STD)])
def test_normalization_is_the_hosts_bit_for_bit(norm):
    # Every value in every channel, in both layouts the step uses.
    values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1).reshape(1, 16, 16, 3)
    host = data.normalize(values, mean=norm[0], std=norm[1])
    np.testing.assert_array_equal(host, slow_normalize(values, *norm))
    for shape in ((1, 16, 16, 3), (1, 8, 96)):
        fn = jax.jit(lambda x: device.normalize_on_device(x, *norm))
        got = np.asarray(fn(values.reshape(shape))).reshape(host.shape)
        np.testing.assert_array_equal(got, host)


def test_plans_follow_the_documented_rule_and_resume_a_host_iterator(dataset):
    batch_size, seed = 16, 5
    steps = N // batch_size
    plans = data.train_plans(
        dataset, batch_size=batch_size, seed=seed, process_index=0, process_count=1
    )
    for step in range(2 * steps + 1):
        plan = next(plans)
        epoch, k = divmod(step, steps)
        order = np.random.default_rng([seed, 0, epoch]).permutation(N)
        np.testing.assert_array_equal(plan["index"], order[k * batch_size : (k + 1) * batch_size])
        rng = np.random.default_rng([seed, 1, epoch, k])
        corners = rng.integers(0, 9, size=(2, batch_size))
        flips = rng.random(batch_size) < 0.5
        np.testing.assert_array_equal(plan["crop"], np.stack([*corners, flips], axis=1))
        assert plan["index"].dtype == plan["crop"].dtype == np.int32
    # The host iterator's saved position resumes the plans (and the other way round).
    host = data.train_iterator(
        dataset, batch_size=batch_size, seed=seed, process_index=0, process_count=1
    )
    for _ in range(4):
        next(host)
    state = host.get_state()
    host.close()
    resumed = data.train_plans(
        dataset,
        batch_size=batch_size,
        seed=seed,
        start_step=state,
        process_index=0,
        process_count=1,
    )
    assert resumed.get_state() == state
    fresh = data.train_plans(
        dataset, batch_size=batch_size, seed=seed, process_index=0, process_count=1
    )
    np.testing.assert_array_equal(next(resumed)["index"], fresh.batch_at(4)["index"])
    assert "crop" not in next(
        data.train_plans(dataset, batch_size=8, seed=0, augment=False, process_count=1)
    )


def test_two_processes_plan_their_own_rows(dataset):
    kw = dict(batch_size=16, seed=4)
    single = data.train_plans(dataset, process_index=0, process_count=1, **kw)
    procs = [data.train_plans(dataset, process_index=p, process_count=2, **kw) for p in (0, 1)]
    for _ in range(8):
        whole, halves = next(single), [next(p) for p in procs]
        for key in ("index", "crop"):
            assert halves[0][key].shape[0] == 8
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


@pytest.mark.parametrize("num_devices", [1, 8])
def test_the_split_is_sharded_over_data_each_device_its_rows(dataset, num_devices):
    mesh = sharding.make_mesh(num_devices)
    split = device.place_split(dataset, mesh, mean=MEAN, std=STD)
    rows = -(-N // num_devices)
    assert split.pixels.shape == (rows * num_devices, 768) and split.pixels.dtype == np.uint32
    assert split.labels.shape == (rows * num_devices,)
    assert split.num_examples == N and split.mean == MEAN and split.std == STD
    flat = dataset.images.reshape(N, 3072)
    shards = sorted(split.pixels.addressable_shards, key=lambda s: s.index[0].start or 0)
    assert len(shards) == num_devices
    for d, shard in enumerate(shards):
        assert shard.data.shape == (rows, 768)  # each device holds only its rows
        start, stop = d * rows, min((d + 1) * rows, N)
        got = np.asarray(shard.data).view(np.uint8)
        np.testing.assert_array_equal(got[: stop - start], flat[start:stop])
        assert not got[stop - start :].any()  # the padding rows are zeros
    assert device.resident_bytes(N, num_devices) == rows * (3072 + 4)
    assert device.resident_bytes(50_000, 1) == 50_000 * 3076  # CIFAR-10: 154 MB


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("augment", [True, False])
def test_device_batches_are_the_reference_and_the_host_pipelines(dataset, num_devices, augment):
    mesh = sharding.make_mesh(num_devices)
    split = device.place_split(dataset, mesh, mean=MEAN, std=STD)
    make = jax.jit(lambda s, p: device.gather_batch(s, p, mesh))
    kw = dict(batch_size=16, seed=9, augment=augment, process_index=0, process_count=1)
    plans = data.train_plans(dataset, **kw)
    host = data.train_iterator(dataset, prefetch=0, mean=MEAN, std=STD, **kw)
    for _ in range(8):  # crosses the epoch boundary at step 6
        plan = next(plans)
        batch = make(split, sharding.global_batch(plan, mesh))
        image = np.asarray(batch["image"])
        assert batch["image"].sharding.is_equivalent_to(sharding.batch_sharding(mesh), 4)
        for n, idx in enumerate(plan["index"]):
            pixels = dataset.images[idx]
            if augment:
                pixels = slow_crop(pixels, *plan["crop"][n])
            np.testing.assert_array_equal(image[n], slow_normalize(pixels))
        expected = next(host)
        for key in ("image", "label", "mask"):  # bit for bit the host pipeline's batch
            np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])
    host.close()


def test_a_split_too_large_for_the_device_is_refused(dataset, monkeypatch):
    monkeypatch.setattr(device, "_device_memory", lambda devices: 2 * 103 * 3076 - 1)
    with pytest.raises(ValueError, match="host pipeline"):
        device.place_split(dataset, sharding.make_mesh(1))
    device.place_split(dataset, sharding.make_mesh(1), max_memory_fraction=1.0)


@pytest.mark.slow
def test_the_step_takes_plans_and_trains_as_the_host_pipeline(dataset):
    """One step of the tiny model from a plan equals the same step from the host batch."""
    from flax import nnx

    from ood_jax.models import create_model
    from ood_jax.train import (
        bind_objective,
        compile_train_step,
        create_train_state,
        make_optimizer,
        make_train_step,
    )

    mesh = sharding.make_mesh()
    tx = make_optimizer(lambda step: 0.05, momentum=0.9)
    model = create_model("tiny", num_classes=10, rngs=nnx.Rngs(0), width=4, dropout_rate=0.3)
    model_def, state = create_train_state(model, tx, seed=0)
    step = make_train_step(model_def, tx, bind_objective("ce"))
    on_host = compile_train_step(step, mesh)
    on_device = compile_train_step(
        step, mesh, device_data=device.DeviceData(device.place_split(dataset, mesh))
    )
    kw = dict(batch_size=16, seed=1, process_index=0, process_count=1)
    batch = next(data.train_iterator(dataset, prefetch=0, **kw))
    plan = next(data.train_plans(dataset, **kw))
    a, metrics_a = on_host(sharding.replicate(state, mesh), sharding.global_batch(batch, mesh))
    b, metrics_b = on_device(sharding.replicate(state, mesh), sharding.global_batch(plan, mesh))
    for x, y in zip(jax.tree.leaves((a, metrics_a)), jax.tree.leaves((b, metrics_b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="aux split"):
        on_device(b, sharding.global_batch(plan, mesh), sharding.global_batch(plan, mesh))


def test_crop_method_is_select_on_tpus_only():
    # TPUs get the gather-free selects; the CPU (and GPU) a dynamic_slice per image.
    assert device.crop_method(sharding.make_mesh(1)) == "slice"
    tpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform="tpu")]))
    assert device.crop_method(tpu) == "select"
    with pytest.raises(ValueError, match="crop method must be one of"):
        device.crop_flip(np.zeros((1, 32, 32, 3), np.uint8), np.zeros((1, 3), np.int32), "gather")
