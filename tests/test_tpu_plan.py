"""The compile-only TPU planner (experiments.plan.tpu): parsing, checks, and one real TPU compile.

The checks are exercised on programs compiled for the 8 virtual CPU devices (a
correct step, and the same step with its state deliberately sharded); the real
path compiles the ``cpu`` preset's train and eval step, and the evaluation's ODIN
and attack chunk (experiments.plan.tpu_eval), for a v5e-4 slice with XLA's TPU
compiler (libtpu, installed by ``.ci/setup`` into ``.ci/libtpu``; see
``LIBTPU_DIR``), in a subprocess so that libtpu never loads into this one; a
v5e-16 slice's hosts are checked to hold a quarter of the batch each.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.plan import core as plan_core
from experiments.plan import program as tpu_program
from ood_jax import sharding

ROOT = Path(__file__).resolve().parents[1]
# Where .ci/setup installs libtpu (pip install --target): kept off this process's path.
LIBTPU_DIR = Path(os.environ.get("OOD_JAX_LIBTPU_DIR", ROOT / ".ci" / "libtpu"))

HLO = """
  %all-reduce-start.1 = (f32[3,3,16,16]{3,2,1,0}, bf16[16]{0}) all-reduce-start(%a, %b)
  %all-reduce-done.1 = (f32[3,3,16,16]{3,2,1,0}, bf16[16]{0}) all-reduce-done(%all-reduce-start.1)
  %all-reduce.7 = f32[10]{0} all-reduce(%c), to_apply=%add
  %all-gather.2 = s32[8,4]{1,0} all-gather(%d), dimensions={0}
  %fusion.3 = f32[16]{0} fusion(%e), kind=kLoop
"""


def test_collectives_counts_ops_elements_and_bytes_by_hand():
    found = {c["op"]: c for c in tpu_program.collectives(HLO)}
    assert set(found) == {"all-reduce", "all-gather"}
    # start/done pairs count once: 3*3*16*16 + 16 elements, then 10.
    assert found["all-reduce"]["count"] == 2
    assert found["all-reduce"]["elements"] == 2304 + 16 + 10
    assert found["all-reduce"]["bytes"] == 2304 * 4 + 16 * 2 + 10 * 4
    assert found["all-gather"] == {"op": "all-gather", "count": 1, "elements": 32, "bytes": 128}


def test_roofline_is_the_slower_of_compute_and_memory():
    chip = tpu_program.CHIPS["v5e"]
    compute_bound = {"flops": 197e12, "bytes_accessed": 1e9}
    assert tpu_program.roofline(compute_bound, "v5e") == pytest.approx(1.0)
    memory_bound = {"flops": 1e9, "bytes_accessed": 2 * chip["hbm_bw"]}
    assert tpu_program.roofline(memory_bound, "v5e") == pytest.approx(2.0)


class _Device:
    def __init__(self, i, process):
        self.coords, self.process_index, self.slice_index = (i, 0, 0), process, 0


def test_a_batch_that_does_not_divide_is_one_line_naming_the_fix():
    config = plan_core.preset_config("ce", "cpu", "float32")
    config.train.batch_size = 250
    tpu = plan_core.Slice("v5e:2x2", "v5e", tuple(_Device(i, 0) for i in range(4)), 1, 16e9)
    with pytest.raises(tpu_program.PlanError) as err:
        plan_core.check_batch(config, tpu)
    message = str(err.value)
    assert "\n" not in message
    assert "batch_size 250 does not divide over the 4 devices" in message
    assert "--config.train.batch_size=248" in message


def test_per_process_batch_on_a_multi_host_slice():
    config = plan_core.preset_config("logitnorm", "paper", "bfloat16")
    tpu = plan_core.Slice("v5e:4x4", "v5e", tuple(_Device(i, i // 4) for i in range(16)), 4, 16e9)
    assert plan_core.check_batch(config, tpu) == config.train.batch_size // 4


def _compiled_step(state_sharded: bool):
    lowered, state = _lowered_step(state_sharded)
    return lowered.compile(), state


def _lowered_step(state_sharded: bool, donate: bool = True):
    """The runner's own smoke-preset CE step lowered for the 8 CPU devices; with
    ``state_sharded`` the state's first axis is split over ``data`` where it divides;
    without ``donate``, a copy of the step that does not donate the state."""
    from experiments.run_config import model_identity
    from experiments.steps import make_run_optimizer, make_run_steps
    from ood_jax.models import build_model
    from ood_jax.train import create_train_state

    config = plan_core.preset_config("ce", "smoke", "float32")
    mesh = sharding.make_mesh()
    optimizer = make_run_optimizer(config, 10)
    model_def, state = create_train_state(
        build_model(model_identity(config, 10), 0), optimizer.tx, seed=0
    )
    train_step, _ = make_run_steps(config, model_def, optimizer, mesh)
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)

    def placed(x):
        split = state_sharded and np.ndim(x) and np.shape(x)[0] % 8 == 0
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=data if split else rep)

    state_abs = jax.tree.map(placed, state)
    batch = {
        "image": jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.float32, sharding=data),
        "label": jax.ShapeDtypeStruct((16,), jnp.int32, sharding=data),
        "mask": jax.ShapeDtypeStruct((16,), jnp.bool_, sharding=data),
    }
    if state_sharded or not donate:
        # The runner's jit pins the state replicated; a broken step shards it.
        jitted = jax.jit(
            train_step.jitted.__wrapped__,
            in_shardings=(jax.tree.map(lambda s: s.sharding, state_abs), data, data),
            donate_argnums=0 if donate else (),
        )
        return jitted.lower(state_abs, batch, None), state
    return train_step.jitted.lower(state_abs, batch, None), state


class _FakeCompiled:
    """What check_program reads of a compiled step: shardings, HLO text, memory."""

    def __init__(self, hlo, state):
        self._hlo, self._state = hlo, state

    @property
    def input_shardings(self):
        mesh = sharding.make_mesh()
        rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        return (jax.tree.map(lambda _: rep, self._state), {"image": data}, None), {}

    def as_text(self):
        return self._hlo

    def memory_analysis(self):
        class Memory:
            alias_size_in_bytes = 10**9

        return Memory()


def test_batchnorm_statistics_must_be_all_reduced_beyond_the_gradients():
    # A conv kernel [3,3,16,16] and a BatchNorm of 16 channels (scale, bias): 2,336
    # parameters. Its gradients alone are not enough; the forward pass's per-channel
    # mean and mean of squares (2 x 16 elements) are.
    params = {"conv": np.zeros((3, 3, 16, 16)), "bn": {"scale": np.zeros(16), "bias": np.zeros(16)}}

    class State:
        pass

    state = State()
    state.params = params
    grads = "  %all-reduce.1 = (f32[3,3,16,16]{3,2,1,0}, f32[16]{0}, f32[16]{0}) all-reduce(%g)\n"
    stats = "  %all-reduce.2 = (f32[16]{0}, f32[16]{0}) all-reduce(%s)\n"
    with pytest.raises(tpu_program.PlanError, match="BatchNorm statistics are not reduced"):
        tpu_program.check_program(_FakeCompiled(grads, params), state, bn_channels=16, name="x")
    facts = tpu_program.check_program(
        _FakeCompiled(grads + stats, params), state, bn_channels=16, name="x"
    )
    assert (facts["params"], facts["all_reduced_elements"]) == (2304 + 32, 2304 + 32 + 32)


def test_the_lowered_step_is_checked_before_any_compile():
    lowered, state = _lowered_step(state_sharded=False)
    facts = tpu_program.check_lowered(lowered, state, name="ce/smoke")
    # image, label, mask; no outliers for CE.
    assert facts == {"state_leaves": len(jax.tree.leaves(state)), "batch_leaves": 3}
    for broken, says in [
        (_lowered_step(state_sharded=True), "a train state leaf is split as [['data']"),
        (_lowered_step(state_sharded=False, donate=False), "is not donated"),
    ]:
        with pytest.raises(tpu_program.PlanError, match=re.escape(says)) as err:
            tpu_program.check_lowered(*broken, name="broken")
        assert "\n" not in str(err.value)


def test_lowered_arguments_are_read_by_hand():
    text = """
  func.func public @main(%arg0: tensor<i32> {sdy.sharding = #sdy.sharding<@mesh, []>,
      tf.aliasing_output = 0 : i32}, %arg1: tensor<16x3xf32> {sdy.sharding =
      #sdy.sharding<@mesh, [{"data"}, {}]>}) -> (tensor<i32>) {
"""
    assert tpu_program.lowered_arguments(text) == [
        {"dims": [], "aliased": True},
        {"dims": [["data"], []], "aliased": False},
    ]


def test_the_runners_step_keeps_the_designs_promises_on_8_devices():
    compiled, state = _compiled_step(state_sharded=False)
    facts = tpu_program.check_program(
        compiled, state, bn_channels=tpu_program.bn_channels(state.batch_stats), name="ce/smoke"
    )
    num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(state.params))
    assert facts["params"] == num_params
    assert num_params <= facts["all_reduced_elements"] < 2 * num_params
    assert facts["donated_bytes"] >= 4 * num_params


def test_a_state_sharded_over_data_is_caught_in_one_line():
    compiled, state = _compiled_step(state_sharded=True)
    with pytest.raises(tpu_program.PlanError) as err:
        tpu_program.check_program(compiled, state, bn_channels=0, name="broken")
    assert "\n" not in str(err.value)
    assert "the train state must be replicated" in str(err.value)


def _libtpu_env() -> dict:
    """This process's environment with libtpu on the path (for a subprocess)."""
    if not (LIBTPU_DIR / "libtpu").is_dir():
        pytest.fail(
            f"libtpu is not in {LIBTPU_DIR}: pip install --target {LIBTPU_DIR} --no-deps "
            "libtpu==0.0.42.1 (what .ci/setup does), or set OOD_JAX_LIBTPU_DIR."
        )
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(LIBTPU_DIR), str(ROOT)]),
        "JAX_PLATFORMS": "cpu",
    }


def _run_with_libtpu(*args: str) -> None:
    run = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_libtpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def _json_with_libtpu(script: str, tmp_path) -> object:
    """What ``script`` (run with libtpu, its output path as ``sys.argv[1]``) wrote as JSON."""
    out = tmp_path / "out.json"
    _run_with_libtpu("-c", script, str(out))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_cpu_preset_compiles_for_a_v5e_slice_with_the_tpu_compiler(tmp_path):
    out = tmp_path / "plan"
    argv = ["--method", "ce", "--preset", "cpu", "--topology", "v5e:2x2", "--output", str(out)]
    _run_with_libtpu("-m", "experiments.plan.tpu", *argv)
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["devices"] == 4 and row["processes"] == 1
    assert row["checks"]["batch_sharded"] and row["checks"]["state_replicated"]
    assert row["checks"]["all_reduced_elements"] >= row["checks"]["params"] > 400_000
    assert row["checks"]["donated_bytes"] > 0
    assert row["checks"]["process_rows"] == {"0": 256}  # one host reads the whole batch
    assert 0 < row["memory"]["peak_bytes"] < row["hbm_per_device"]
    assert row["cost"]["flops"] > 1e9 and row["eval"]["cost"]["flops"] > 1e9
    assert row["estimate"]["images_per_s"] > 0
    assert "| ce | cpu | v5e:2x2 |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_every_paper_presets_train_step_lowers_for_v5e_slices(tmp_path):
    # Compiling a paper preset takes 1-4 minutes (results/plans/tpu_plan.md), too
    # long for every CI run; lowering it for the TPU slice is a few seconds: every
    # method's real step and config, checked before XLA's compile (state replicated and
    # donated, batch and outliers over 'data', each v5e-16 host holding its quarter).
    # CI compiles the cpu preset's step for TPU (above); the paper presets' compiled
    # programs are in the committed table.
    script = (
        "import json, sys\n"
        "from experiments.plan import core as plan_core, tpu as tpu_plan\n"
        "from experiments import methods\n"
        "found = {}\n"
        "for topology in ('v5e:2x2', 'v5e:4x4'):\n"
        "    target = tpu_plan.tpu_slice(topology)\n"
        "    for m in methods.METHODS:\n"
        "        config = plan_core.preset_config(m, 'paper', 'bfloat16')\n"
        "        lowered, steps = plan_core.lower_train_step(config, target)\n"
        "        loops = lowered.as_text().count('stablehlo.while')\n"
        "        found[f'{m} {topology}'] = [config.model.name, config.train.batch_size,\n"
        "                                    steps.checks, loops]\n"
        "open(sys.argv[1], 'w').write(json.dumps(found))\n"
    )
    found = _json_with_libtpu(script, tmp_path)
    models = {"logitnorm": "wrn40_2", "ce": "wrn40_2", "oe": "wrn40_2", "energy_ft": "wrn40_2"}
    models |= {"ceda": "resnet18", "acet": "resnet18", "l2norm": "resnet18"}
    for method, model in models.items():
        for topology, hosts in (("v5e:2x2", 1), ("v5e:4x4", 4)):
            name, batch, checks, loops = found[f"{method} {topology}"]
            assert name == model, method
            # ACET's 40-step attack is a loop on TPU, as the runner builds it there, though
            # this process's default backend is the CPU (it would unroll it there).
            assert (loops > 0) == (method == "acet"), (method, loops)
            # image, label, mask; the outlier methods add their outlier images.
            assert checks["batch_leaves"] == (4 if method in ("oe", "energy_ft") else 3), method
            assert checks["state_leaves"] > 100
            assert checks["process_rows"] == {str(h): batch // hosts for h in range(hosts)}


@pytest.mark.slow
def test_a_loop_attacks_cost_is_counted_for_every_step(tmp_path):
    # XLA counts a loop body once: the planner adds the other steps, each costed as
    # the difference of 2-step and 1-step unrolled copies. Checked against the whole
    # attack unrolled (smoke preset's tiny model, a 4-step attack, v5e:2x2).
    script = (
        "import json, sys\n"
        "from experiments.plan import core as plan_core, tpu as tpu_plan, program as tpu_program\n"
        "from ood_jax import attacks\n"
        "config = plan_core.preset_config('acet', 'smoke', 'bfloat16',\n"
        "                                 ['--config.objective.hparams.attack_steps=4'])\n"
        "target = tpu_plan.tpu_slice('v5e:2x2')\n"
        "cost = lambda lowered: tpu_program.compiled_cost(lowered.compile())\n"
        "loop = cost(plan_core.lower_train_step(config, target)[0])\n"
        "planned = plan_core.attack_loop_cost(config, target, lambda l, c: cost(l), loop)\n"
        "with attacks.unrolling():\n"
        "    unrolled = cost(plan_core.lower_train_step(config, target)[0])\n"
        "open(sys.argv[1], 'w').write(json.dumps([loop, planned, unrolled]))\n"
    )
    loop, planned, unrolled = _json_with_libtpu(script, tmp_path)
    assert planned["trips"] == 4
    assert loop["flops"] < 0.8 * unrolled["flops"]  # the loop's body counted once
    assert planned["cost"]["flops"] == pytest.approx(unrolled["flops"], rel=0.02)
    # Bytes: the loop program also moves its carried state (here 11% more traffic than
    # the unrolled copy); the loop is never counted as cheaper than unrolled.
    assert 1.0 <= planned["cost"]["bytes_accessed"] / unrolled["bytes_accessed"] < 1.25


def test_bn_channels_count_running_means_only():
    stats = {
        "bn1": {"mean": np.zeros(16), "var": np.ones(16)},
        "conv1": {"u": np.zeros(32)},  # spectral norm's power-iteration vector
        "block": {"bn": {"mean": np.zeros(8), "var": np.ones(8)}},
    }
    assert tpu_program.bn_channels(stats) == 16 + 8


def test_process_rows_of_one_process_are_the_whole_batch():
    mesh = sharding.make_mesh()
    assert plan_core.check_process_rows(mesh, 16, 16, name="cpu") == {0: 16}
    with pytest.raises(tpu_program.PlanError) as err:
        plan_core.check_process_rows(mesh, 16, 4, name="cpu")
    assert "\n" not in str(err.value) and "{0: 16}" in str(err.value)


@pytest.mark.slow
def test_each_host_of_a_v5e_4x4_slice_holds_a_quarter_of_the_batch(tmp_path):
    script = (
        "import json, sys; from experiments.plan import core as plan_core, tpu as tpu_plan\n"
        "from ood_jax import sharding\n"
        "tpu = tpu_plan.tpu_slice('v5e:4x4')\n"
        "mesh = sharding.make_mesh(devices=tpu.devices)\n"
        "rows = plan_core.check_process_rows(mesh, 1024, 256, name='v5e:4x4')\n"
        "open(sys.argv[1], 'w').write(json.dumps([tpu.processes, rows]))\n"
    )
    processes, rows = _json_with_libtpu(script, tmp_path)
    # 16 chips, 4 hosts of 4: each host reads 1024 / 4 rows.
    assert processes == 4
    assert rows == {"0": 256, "1": 256, "2": 256, "3": 256}


@pytest.mark.slow
def test_cpu_preset_odin_and_attack_chunk_compile_for_a_v5e_slice(tmp_path):
    script = (
        "import json, sys; from experiments.plan import tpu_eval as tpu_eval_plan\n"
        "row = tpu_eval_plan.plan_eval('ce', 'cpu', 'v5e:2x2', 'bfloat16',\n"
        "                              programs=('odin', 'attack chunk'))\n"
        "open(sys.argv[1], 'w').write(json.dumps(row, default=str))\n"
    )
    row = _json_with_libtpu(script, tmp_path)
    assert row["model"] == "resnet9(pooling=max, width=16)" and row["devices"] == 4
    assert set(row["programs"]) == {"odin", "attack chunk"}
    odin, chunk = row["programs"]["odin"], row["programs"]["attack chunk"]
    # eval batch 500 (a multiple of 4); attack batch min(500, ATTACK_BATCH=128, 1000).
    assert (odin["batch"], chunk["batch"]) == (500, 128)
    for program in (odin, chunk):
        assert program["batch_axis"] == "data"
        memory = program["memory"]
        assert 0 < memory["peak_bytes"] <= memory["xla_peak_bytes"] < row["hbm_per_device"]
        assert program["fits"]
        assert memory["argument_bytes"] > 4 * 400_000  # the replicated model
    # Per image and device, ODIN is a forward, a backward (~2 forwards) and a forward:
    # ~4 forwards; a chunk is 8 steps of a forward and a backward: ~24, so ~6 times ODIN.
    ratio = (chunk["cost"]["flops"] / (128 / 4)) / (odin["cost"]["flops"] / (500 / 4))
    assert 4 < ratio < 8
    assert (odin["loop_trips"], chunk["loop_trips"]) == (1, 8)  # on TPU the chunk is a loop
    # 1000 noise images in batches of 128 (8 batches), 40 steps in chunks of 8.
    assert row["attack"]["chunk_calls"] == 8 * 5
    assert row["attack"]["estimate_s"] == pytest.approx(40 * chunk["call_s"])


def test_eval_jobs_are_one_per_model_whatever_the_objective():
    from experiments.plan import tpu_eval as tpu_eval_plan

    runs = [(m, "paper", "v5e:2x2", "bfloat16", ()) for m in ("logitnorm", "ce", "l2norm", "acet")]
    models = [fields["model"] for fields, _ in tpu_eval_plan.jobs(runs)]
    # LogitNorm and CE train the same WRN-40-2; L2 a spectral-norm ResNet-18; ACET a plain one.
    assert models == [
        "wrn40_2(dropout_rate=0.3)",
        "resnet18(activation=leaky_relu, normalize_features=True, pooling=avg, spectral_norm=True)",
        "resnet18()",
    ]


def test_a_table_keeps_earlier_rows_and_compiles_only_new_ones(tmp_path):
    from experiments.plan import table as plan_table

    out, calls = str(tmp_path / "table"), []

    def job(name):
        return {"name": name}, lambda: calls.append(name) or {"name": name, "value": len(calls)}

    def table(rows, header):
        return "\n".join(f"| {r['name']} |" for r in rows) + "\n"

    kwargs = {"key_fields": ("name",), "markdown": table, "output": out, "command": "test"}
    plan_table.run_rows([job("a"), job("b")], **kwargs)
    rows = plan_table.run_rows([job("b"), job("c")], **kwargs)
    assert calls == ["a", "b", "c"]  # b was not planned again
    assert [(r["name"], r["value"]) for r in rows] == [("a", 1), ("b", 2), ("c", 3)]
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == rows


def test_a_run_killed_mid_table_loses_no_earlier_row(tmp_path):
    # The rows a run re-lists (a, c) are in the file while it plans a new one (b), so
    # a crash in a later compile (d) keeps them all: every row written so far.
    from experiments.plan import table as plan_table

    out = str(tmp_path / "table")

    def job(name, value=0):
        return {"name": name}, lambda: {"name": name, "value": value}

    def crash():
        raise KeyboardInterrupt  # a compiler crash or a kill: not an error row

    def table(rows, header):
        return "\n".join(f"| {r['name']} |" for r in rows) + "\n"

    kwargs = {"key_fields": ("name",), "markdown": table, "output": out, "command": "test"}
    plan_table.run_rows([job("a", 1), job("c", 3)], **kwargs)
    with pytest.raises(KeyboardInterrupt):
        plan_table.run_rows([job("b", 2), job("a"), job("c"), ({"name": "d"}, crash)], **kwargs)
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert sorted((r["name"], r["value"]) for r in rows) == [("a", 1), ("b", 2), ("c", 3)]


def test_a_compile_that_raised_is_tried_again_by_the_next_run(tmp_path):
    from experiments.plan import table as plan_table

    out, calls = str(tmp_path / "table"), []

    def broken():
        raise SyntaxError("a half-edited module")

    def ok():
        calls.append("a")
        return {"name": "a", "value": 1}

    def refused():
        from experiments.plan.program import PlanError

        calls.append("b")
        raise PlanError("does not fit")

    def table(rows, header):
        return "\n".join(f"| {r['name']} |" for r in rows) + "\n"

    kwargs = {"key_fields": ("name",), "markdown": table, "output": out, "command": "test"}
    plan_table.run_rows([({"name": "a"}, broken), ({"name": "b"}, refused)], **kwargs)
    rows = plan_table.run_rows([({"name": "a"}, ok), ({"name": "b"}, refused)], **kwargs)
    # a is compiled again; b's verdict (a PlanError) stands without a second compile.
    assert calls == ["b", "a"]
    assert rows[0] == {"name": "a", "value": 1} and rows[1]["error"] == "does not fit"


FAKE_PLAN = """
import json, os, signal, sys
what, out = sys.argv[1], sys.argv[sys.argv.index("--output") + 1]
if what == "segfault":
    os.kill(os.getpid(), signal.SIGSEGV)
if what == "refuse":
    print("error: 8 GiB does not fit a v5e chip's 16 GiB", file=sys.stderr)
    sys.exit(2)
if what == "broken":
    sys.exit(1)
with open(out + ".json", "w") as f:
    json.dump({"rows": [{"name": what, "value": 7}]}, f)
"""


def test_a_compiler_that_kills_its_process_is_an_error_row_and_the_table_goes_on(
    tmp_path, monkeypatch
):
    # libtpu 0.0.42.1 dies of SIGSEGV compiling WRN-40-2 for v6e: with one process per
    # row, that row says so and the others are still planned; a refusal (exit 2) is the
    # plan's verdict, and any other exit a failure tried again by the next run.
    from experiments.plan import table as plan_table

    (tmp_path / "fake_plan.py").write_text(FAKE_PLAN)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    out = str(tmp_path / "table")

    def job(what):
        return {"name": what}, plan_table.isolated("fake_plan", [what])

    def table(rows, header):
        return "\n".join(f"| {r['name']} | {r.get('error', '')} |" for r in rows) + "\n"

    kwargs = {"key_fields": ("name",), "markdown": table, "output": out, "command": "test"}
    jobs = [job("segfault"), job("refuse"), job("broken"), job("fine")]
    rows = plan_table.run_rows(jobs, versions="libtpu 1", **kwargs)
    errors = {r["name"]: r.get("error") for r in rows}
    assert errors["segfault"] == "the compiler crashed its process (SIGSEGV) (libtpu 1)"
    assert errors["refuse"] == "8 GiB does not fit a v5e chip's 16 GiB"
    assert errors["broken"].startswith("compile failed: RuntimeError: exit 1")
    assert rows[-1] == {"name": "fine", "value": 7}
    # The crash stands under the same versions and is planned again under new ones.
    assert plan_table._retry(rows[0], "libtpu 1") is False
    assert plan_table._retry(rows[0], "libtpu 2") is True
    assert plan_table._retry(rows[2], "libtpu 1") is True


@pytest.mark.parametrize("eval_", [False, True])
def test_several_rows_each_get_a_process_with_their_own_arguments(tmp_path, monkeypatch, eval_):
    # main hands plan_table.isolated each row's own command line, the runner's config
    # overrides included (one per model for --eval: LogitNorm and CE share WRN-40-2);
    # one row, or --in_process, stays here.
    from experiments.plan import table as plan_table
    from experiments.plan import tpu as tpu_plan

    children = []
    override = "--config.train.batch_size=256"

    def isolated(module, args):
        children.append((module, args))
        flag = dict(zip(args[::2], args[1::2], strict=False))
        name = "model" if eval_ else "method"
        key = {"preset": flag["--preset"], "topology": flag["--topology"]}
        key |= {"precision": flag["--precision"], name: flag["--method"]}
        return lambda: {**key, "overrides": "train.batch_size=256" if override in args else ""}

    monkeypatch.setattr(plan_table, "isolated", isolated)
    argv = ["--method", "logitnorm,ce,l2norm", "--topology", "v5e:2x2,v4:2x2x1", override]
    argv += ["--output", str(tmp_path / "t")] + (["--eval"] if eval_ else [])
    monkeypatch.setattr(tpu_plan.plan_core, "markdown", lambda rows, header, **_: "|\n")
    if eval_:
        from experiments.plan import tpu_eval as tpu_eval_plan

        monkeypatch.setattr(tpu_eval_plan, "markdown", lambda rows, header: "|\n")
    rows = tpu_plan.main(argv)
    methods = ["logitnorm", "l2norm"] if eval_ else ["logitnorm", "ce", "l2norm"]
    expected = [
        [
            "--method", m, "--preset", "paper", "--topology", t, "--precision", "bfloat16",
            override, *(["--eval"] if eval_ else []),
        ]
        for m in methods
        for t in ("v5e:2x2", "v4:2x2x1")
    ]  # fmt: skip
    assert [args for _, args in children] == expected
    assert {module for module, _ in children} == {"experiments.plan.tpu"}
    assert {r["overrides"] for r in rows} == {"train.batch_size=256"}
    # One row: planned in this process, no child.
    children.clear()
    monkeypatch.setattr(tpu_plan, "plan", lambda method, *_: {"method": method})
    if not eval_:
        one = tpu_plan.main(["--method", "ce", "--topology", "v5e:2x2", "--output", ""])
        assert children == [] and one[0]["method"] == "ce"


def test_a_planned_run_takes_the_runners_overrides_and_refuses_bad_ones():
    from experiments import cli
    from experiments.plan import core as plan_core

    config = plan_core.preset_config(
        "l2norm", "paper", "float32", ["--config.train.batch_size=256", "--config.optim.lr=0.2"]
    )
    assert (config.train.batch_size, config.optim.lr, config.model.mixed_precision) == (
        256,
        0.2,
        False,
    )
    assert plan_core.preset_cell({"preset": "paper", "overrides": "train.batch_size=256"}) == (
        "paper (train.batch_size=256)"
    )
    for bad, says in [
        ("--config.train.no_such_field=1", "unknown config field"),
        ("--config.model.mixed_precision=true", "--precision"),
    ]:
        with pytest.raises(cli.UsageError, match=says):
            plan_core.preset_config("ce", "paper", "bfloat16", [bad])
    # On the command line, before any compile (no TPU compiler is loaded for these).
    from experiments.plan import tpu as tpu_plan

    with pytest.raises(cli.UsageError, match="unrecognized argument '--batch=3'"):
        tpu_plan.main(["--method", "ce", "--batch=3"])
    with pytest.raises(cli.UsageError, match="unknown config field"):
        tpu_plan.main(["--method", "ce,oe", "--config.train.batchsize=3"])
