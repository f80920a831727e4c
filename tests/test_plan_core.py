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
    assert "| 0.25 / 0.50 / 1.00 / 1.50 | 80.00 |" in new
    assert "| 0.25 / 0.50 / 1.00 / - | 80.00 |" in old
    assert "| 77, 4.5 | 0.19 ms | 1,347,368 | 0.0 s | 7.4 s |" in new
    assert all(line.count("|") == 18 for line in lines if line.startswith("| ce"))
