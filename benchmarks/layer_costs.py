"""The train step taken apart: each layer's pieces timed alone, XLA:CPU against PyTorch.

    pip install torch==2.13.0   # benchmark only; not an ood_jax dependency
    python benchmarks/layer_costs.py --model resnet9            # both frameworks
    python benchmarks/layer_costs.py --model resnet9 --variants # + JAX formulations

For every 3x3 convolution of the model (batch 128, float32, NHWC in JAX, NCHW in
PyTorch) it times the forward convolution, the input gradient and the weight
gradient, and the BatchNorm (training mode) + ReLU block and the 2x2 max-pool,
forward and backward, each jitted alone (JAX) or run alone (PyTorch), median
of ``--reps`` calls after a warm-up. Each framework runs in its own process,
``--rounds`` times, alternating; the tables give the median over rounds (and
the sums' min-max), because single runs of these millisecond pieces move by
30% on this VM.
The sum of the parts against the measured step shows how much of the step
they explain; the per-part ratio shows where XLA:CPU loses to PyTorch's oneDNN
kernels. ``--variants`` adds other JAX formulations of the same maths (im2col
matmuls, JAX's autodiff of BatchNorm, ``lax.reduce_window`` max-pool); the
im2col convolution is checked against XLA's to 1e-4 before it is timed.

Measure on a quiet machine (load average < 1); the script prints the load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"


def layers(model: str) -> list[dict]:
    """(spatial size, in channels, out channels, pooled after) of each 3x3 conv."""
    if model == "resnet9":
        w = 16
        spec = [
            (32, 3, w, False),
            (32, w, 2 * w, True),
            (16, 2 * w, 2 * w, False),
            (16, 2 * w, 2 * w, False),
            (16, 2 * w, 4 * w, True),
            (8, 4 * w, 8 * w, True),
            (4, 8 * w, 8 * w, False),
            (4, 8 * w, 8 * w, False),
        ]
    elif model == "resnet18":
        spec = [(32, 3, 64, False)] + [(32, 64, 64, False)] * 4
    else:
        raise ValueError(model)
    return [dict(hw=hw, cin=cin, cout=cout, pool=pool) for hw, cin, cout, pool in spec]


def timeit(reps: int, fn, *fn_args) -> float:
    """Median milliseconds of ``fn(*fn_args)`` over ``reps`` calls, after two warm-up calls."""
    fn(*fn_args)
    fn(*fn_args)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*fn_args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# -- JAX ------------------------------------------------------------------------------------


def jax_parts(args) -> list[dict]:
    os.environ["XLA_FLAGS"] = XLA_FLAGS
    import jax
    import jax.numpy as jnp
    import numpy as np

    conv = jax.jit(
        lambda x, k: jax.lax.conv_general_dilated(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    )

    def im2col(x):
        n, h, w, c = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)]
        return jnp.concatenate(cols, axis=-1)  # [n, h, w, 9c], (kh, kw, c) order

    def conv_im2col(x, k):
        return im2col(x) @ k.reshape(-1, k.shape[-1])

    sys.path.insert(0, str(ROOT))
    from ood_jax.models.layers import batch_norm_train, max_pool_2x2

    def bn_relu(x, scale, bias):  # the models' BatchNorm: closed-form backward
        return jax.nn.relu(batch_norm_train(x, scale, bias, 1e-5)[0])

    def bn_relu_autodiff(x, scale, bias):  # nnx.BatchNorm's maths, differentiated by JAX
        mean = x.mean((0, 1, 2))
        var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
        return jax.nn.relu((x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias)

    def pool_window(x):
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

    def synced(fn):
        return lambda *a: jax.block_until_ready(fn(*a))

    def grads(f, x, k):
        _, vjp_x = jax.vjp(lambda x_: f(x_, k), x)
        _, vjp_k = jax.vjp(lambda k_: f(x, k_), k)
        return jax.jit(lambda g: vjp_x(g)[0]), jax.jit(lambda g: vjp_k(g)[0])

    def layer_parts(spec, rng):
        n, hw, cin, cout = args.batch_size, spec["hw"], spec["cin"], spec["cout"]
        x = jnp.asarray(rng.standard_normal((n, hw, hw, cin), np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) / (3 * cin**0.5))
        dy = jnp.asarray(rng.standard_normal((n, hw, hw, cout), np.float32))
        scale, bias = jnp.ones(cout), jnp.zeros(cout)
        y = conv(x, k)
        parts = {}
        fwd = {"": conv}
        if args.variants:
            fwd[" (im2col matmul)"] = jax.jit(conv_im2col)
        ref_gx, ref_gk = grads(conv, x, k)
        for suffix, f in fwd.items():
            gx, gk = grads(f, x, k)
            for got, want in ((f(x, k), y), (gx(dy), ref_gx(dy)), (gk(dy), ref_gk(dy))):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
            parts["conv forward" + suffix] = timeit(args.reps, synced(f), x, k)
            parts["conv input grad" + suffix] = timeit(args.reps, synced(gx), dy)
            parts["conv weight grad" + suffix] = timeit(args.reps, synced(gk), dy)
        bns = {"": bn_relu}
        if args.variants:
            bns[" (autodiff)"] = bn_relu_autodiff
        for suffix, bn in bns.items():
            _, vjp_bn = jax.vjp(bn, y, scale, bias)
            parts["bn+relu forward" + suffix] = timeit(
                args.reps, synced(jax.jit(bn)), y, scale, bias
            )
            parts["bn+relu backward" + suffix] = timeit(args.reps, synced(jax.jit(vjp_bn)), dy)
        if spec["pool"]:
            pools = {"": max_pool_2x2}  # the models' max-pool
            if args.variants:
                pools[" (lax.reduce_window)"] = pool_window
            r = jax.nn.relu(y)
            for suffix, pool in pools.items():
                out, vjp_p = jax.vjp(pool, r)
                parts["max-pool forward" + suffix] = timeit(args.reps, synced(jax.jit(pool)), r)
                parts["max-pool backward" + suffix] = timeit(
                    args.reps, synced(jax.jit(vjp_p)), jnp.ones_like(out)
                )
        return parts

    rng = np.random.default_rng(0)
    return [{"layer": spec, "parts": layer_parts(spec, rng)} for spec in layers(args.model)]


# -- PyTorch --------------------------------------------------------------------------------


def torch_parts(args) -> list[dict]:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)

    def conv_backward(dy, x, k, mask):
        return torch.ops.aten.convolution_backward(
            dy, x, k, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    def bn_relu(bn, y):
        return F.relu(bn(y))

    def layer_parts(spec):
        n, hw, cin, cout = args.batch_size, spec["hw"], spec["cin"], spec["cout"]
        x = torch.randn(n, cin, hw, hw)
        k = torch.randn(cout, cin, 3, 3) / (3 * cin**0.5)
        dy = torch.randn(n, cout, hw, hw)
        parts = {}
        with torch.no_grad():
            y = F.conv2d(x, k, padding=1)
            parts["conv forward"] = timeit(args.reps, F.conv2d, x, k, None, 1, 1)
            parts["conv input grad"] = timeit(
                args.reps, conv_backward, dy, x, k, [True, False, False]
            )
            parts["conv weight grad"] = timeit(
                args.reps, conv_backward, dy, x, k, [False, True, False]
            )
        bn = torch.nn.BatchNorm2d(cout).train()
        yg = y.clone().requires_grad_(True)
        parts["bn+relu forward"] = timeit(args.reps, bn_relu, bn, yg)
        out = bn_relu(bn, yg)
        parts["bn+relu backward"] = timeit(
            args.reps,
            partial(torch.autograd.grad, retain_graph=True),
            out,
            (yg, *bn.parameters()),
            dy,
        )
        if spec["pool"]:
            r = F.relu(y).requires_grad_(True)
            parts["max-pool forward"] = timeit(args.reps, F.max_pool2d, r, 2)
            pooled = F.max_pool2d(r, 2)
            parts["max-pool backward"] = timeit(
                args.reps,
                partial(torch.autograd.grad, retain_graph=True),
                pooled,
                r,
                torch.ones_like(pooled),
            )
        return parts

    return [{"layer": spec, "parts": layer_parts(spec)} for spec in layers(args.model)]


# -- driver ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet9", choices=("resnet9", "resnet18"))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs per framework")
    p.add_argument("--variants", action="store_true", help="also time other JAX formulations")
    p.add_argument("--frameworks", default="jax,torch")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rows = (jax_parts if args.worker == "jax" else torch_parts)(args)
        print(json.dumps(rows))
        return
    load = os.getloadavg()[0]
    fws = args.frameworks.split(",")
    runs = {fw: [] for fw in fws}
    for _ in range(args.rounds):  # alternate the frameworks, one process per framework and round
        for fw in fws:
            cmd = [sys.executable, __file__, f"--worker={fw}", f"--model={args.model}"]
            cmd += [f"--batch-size={args.batch_size}", f"--reps={args.reps}"]
            cmd += ["--variants"] if args.variants else []
            env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())}
            env["TF_CPP_MIN_LOG_LEVEL"] = "3"
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[fw].append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"{args.model}, batch {args.batch_size}, {os.cpu_count()} threads; each part: median of "
        f"{args.reps} calls, then the median over {args.rounds} alternating rounds (one process "
        f"per framework and round); load average {load:.2f} before, {os.getloadavg()[0]:.2f} "
        f"after; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; XLA_FLAGS {XLA_FLAGS}\n"
    )
    specs = layers(args.model)
    names = list(dict.fromkeys(k for fw in fws for r in runs[fw][0] for k in r["parts"]))

    def per_round(fw, i, name):
        values = [run[i]["parts"].get(name) for run in runs[fw]]
        return None if values[0] is None else values

    two = len(fws) == 2
    header = " | ".join(f"{fw} ms" for fw in fws)
    print(f"| layer | part | {header} |" + (" jax / torch time |" if two else ""))
    print("| --- " * (2 + len(fws) + two) + "|")
    sums = {fw: {} for fw in fws}  # part -> per-round sums over layers
    for i, spec in enumerate(specs):
        tag = f"{spec['hw']}x{spec['hw']} {spec['cin']}->{spec['cout']}"
        for name in names:
            values = {fw: per_round(fw, i, name) for fw in fws}
            if all(v is None for v in values.values()):
                continue
            cells = []
            for fw in fws:
                v = values[fw]
                if v is None:
                    cells.append("-")
                    continue
                acc = sums[fw].setdefault(name, [0.0] * args.rounds)
                sums[fw][name] = [a + b for a, b in zip(acc, v, strict=True)]
                cells.append(f"{statistics.median(v):.2f}")
            ratio = ""
            if two:
                a, b = (values[fw] for fw in fws)
                ratio = " - |"
                if a and b:
                    ratio = f" {statistics.median(a) / statistics.median(b):.2f} |"
            print(f"| {tag} | {name} | {' | '.join(cells)} |{ratio}")
    print("\nSums over layers: median (min-max over rounds)\n")
    print(f"| part | {header} |\n" + "| --- " * (1 + len(fws)) + "|")
    for name in names:
        cells = []
        for fw in fws:
            v = sums[fw].get(name)
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
