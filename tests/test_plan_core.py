"""The device-generic plan core (experiments.plan.core): the memory fit check and the table.

Compiles of real steps are in tests/test_tpu_plan.py (libtpu) and, by hand only,
``python -m experiments.plan.gpu`` (README, "Scale").
"""

import pytest

from experiments.plan import core as plan_core
from experiments.plan import program as tpu_program

GIB = 2**30


def _memory(peak_gib: float, xla_peak_gib: float | None) -> dict:
    memory = {
        "argument_bytes": 0.25 * GIB,
        "output_bytes": 0.25 * GIB,
        "temp_bytes": 0.5 * GIB,
        "alias_bytes": 0.25 * GIB,
        "peak_bytes": peak_gib * GIB,
    }
    if xla_peak_gib is not None:
        memory["xla_peak_bytes"] = xla_peak_gib * GIB
    return memory


@pytest.mark.parametrize(
    ("peak", "xla_peak", "fits"),
    [
        (1.0, 3.0, False),  # XLA's peak over the device's 2 GiB: the sum alone would pass
        (3.0, 1.0, False),
        (1.0, 1.5, True),
        (1.5, None, True),  # a row planned before XLA's peak was kept
        (2.5, None, False),
    ],
)
def test_the_fit_check_uses_the_larger_peak(peak, xla_peak, fits):
    memory = _memory(peak, xla_peak)
    needed = max(peak, xla_peak or 0) * GIB
    assert tpu_program.required_bytes(memory) == needed
    if fits:
        plan_core.check_fits(memory, 2 * GIB, name="ce/cpu on v5e:2x2")
        return
    with pytest.raises(tpu_program.PlanError) as err:
        plan_core.check_fits(memory, 2 * GIB, name="ce/cpu on v5e:2x2")
    assert "\n" not in str(err.value)
    assert f"needs {max(peak, xla_peak or 0):.1f} GiB per device" in str(err.value)


def _row(memory: dict) -> dict:
    return {
        "method": "ce",
        "preset": "cpu",
        "topology": "h100:8",
        "devices": 8,
        "processes": 1,
        "precision": "bfloat16",
        "global_batch": 256,
        "compile_s": 41.2,
        "memory": memory,
        "hbm_per_device": 80 * GIB,
        "cost": {"flops": 4.1e9, "bytes_accessed": 0.65e9},
        "collectives": [{"op": "all-reduce", "count": 77, "elements": 0, "bytes": 4.5e6}],
        "estimate": {
            "step_s": 0.19e-3,
            "images_per_s": 256 / 0.19e-3,
            "epoch_s": 195 * 0.19e-3,
            "total_s": 200 * 195 * 0.19e-3,
            "input_images_per_s_per_host": 256 / 0.19e-3,
            "input_bound_on_2_cores": True,
        },
    }


def test_the_table_shows_xla_peak_where_a_row_has_it_and_takes_a_title():
    rows = [_row(_memory(1.0, 1.5)), _row(_memory(1.0, None))]
    text = plan_core.markdown(rows, {"command": "test"}, title="GPU plans")
    lines = text.splitlines()
    assert lines[0] == "# GPU plans"
    new, old = lines[-2], lines[-1]
    # args 0.25, temp 0.5, peak 1.0, XLA peak 1.5 GiB; the older row has no XLA peak.
    assert "| 0.25 / 0.50 / 1.00 / 1.50 | - | 80.00 |" in new
    assert "| 0.25 / 0.50 / 1.00 / - | - | 80.00 |" in old
    assert "| 77, 4.5 | 0.19 ms | 1,347,368 | 0.0 s | 7.4 s |" in new
    assert all(line.count("|") == 19 for line in lines if line.startswith("| ce"))


def test_a_row_with_the_data_on_the_device_shows_the_split_and_the_plans_it_needs():
    row = _row(_memory(1.0, 1.5))
    row["data_on_device"], row["resident_split_bytes"] = True, 6250 * 3076
    row["estimate"]["input_bytes_per_s_per_host"] = 16 * row["estimate"]["images_per_s"]
    row["estimate"]["input_bound_on_2_cores"] = False
    text = plan_core.markdown([row, _row(_memory(1.0, 1.5))], {"command": "t"}, title="GPU")
    device_row, host_row = text.splitlines()[-2:]
    # 6,250 rows of 3,076 bytes on each of the 8 devices; 16 bytes an image from the host.
    assert "| 0.25 / 0.50 / 1.00 / 1.50 | 18.3 | 80.00 |" in device_row
    assert device_row.endswith("| plans of 1,347,368 images (21.6 MB/s; no pixels) |")
    assert host_row.endswith("| 1,347,368 (input-bound on 2 cores) |")
    assert "data on device" in text and device_row.count("|") == host_row.count("|") == 19


@pytest.mark.parametrize("method", ["ce", "oe"])
def test_the_step_with_the_data_on_the_device_lowers_compiles_and_keeps_the_design(method):
    """The runner's step with the split resident (8 CPU devices): the plans and splits
    over ``data``, the state replicated and donated, one gradient all-reduce; the split
    is never gathered whole, each batch comes by one reduce-scatter."""
    import jax

    config = plan_core.preset_config(method, "smoke", "float32", ["--config.data.on_device=true"])
    target = plan_core.Slice("cpu:8", "v5e", tuple(jax.devices()), 1, 16 * GIB)
    lowered, steps = plan_core.lower_train_step(config, target)
    train, aux = steps.device_data.train, steps.device_data.aux
    assert train.pixels.shape == (50_000, 768) and train.pixels.sharding.spec[0] == "data"
    assert (aux is not None) == (method == "oe")
    batch = config.train.batch_size
    assert steps.checks["batch_leaves"] == 2 + 2 + (2 + 2 if aux is not None else 0)
    expected = 6250 * 3076 + (-(-20_200 // 8) * 3076 if aux is not None else 0)
    assert plan_core.resident_split_bytes(steps.device_data, 8) == expected
    compiled = lowered.compile()
    checks = tpu_program.check_program(
        compiled,
        steps.state,
        bn_channels=tpu_program.bn_channels(steps.state.batch_stats),
        name=method,
    )
    assert checks["state_replicated"]
    found = {c["op"]: c for c in tpu_program.collectives(compiled.as_text())}
    rows = batch * (1 + (config.data.outliers.ratio if aux is not None else 0))
    # Each device receives its rows of each batch, 768 words each, and the labels of
    # the in-distribution rows (no objective reads the outliers'): XLA counts a
    # collective's result. Only the plans' rows are gathered, never the split.
    assert found["reduce-scatter"]["elements"] == rows // 8 * 768 + batch // 8
    assert found.get("all-gather", {"elements": 0})["elements"] <= rows


def test_the_gradient_check_counts_floating_point_all_reduces_only():
    # A TPU step with the data on the device all-reduces the batch's rows (u32 words)
    # beside the gradients: only the latter count as gradient all-reduces.
    hlo = """
  %all-reduce.1 = f32[300]{0} all-reduce(%g), to_apply=%add
  %all-reduce-start.2 = (bf16[100]{0}, f32[20]{0}) all-reduce-start(%h, %i), to_apply=%add
  %all-reduce.3 = u32[256,768]{1,0} all-reduce(%rows), to_apply=%add.1
  %all-reduce.4 = s32[256]{0} all-reduce(%labels), to_apply=%add.2
"""
    (every,) = tpu_program.collectives(hlo)
    assert every["count"] == 4 and every["elements"] == 300 + 120 + 256 * 768 + 256
    (floats,) = tpu_program.collectives(hlo, dtypes=tpu_program.FLOAT_DTYPES)
    assert floats["count"] == 2 and floats["elements"] == 420
    assert floats["bytes"] == 300 * 4 + 100 * 2 + 20 * 4
