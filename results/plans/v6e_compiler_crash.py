"""libtpu's v6e compiler overflows its stack on a two-conv BatchNorm train step (plain JAX).

jax 0.10.2, libtpu 0.0.42.1, compile-only (no TPU needed: a CPU host with libtpu)::

    JAX_PLATFORMS=cpu PYTHONPATH=.ci/libtpu python results/plans/v6e_compiler_crash.py
    ... --topology v5e:2x2   # compiles
    ... --folded             # compiles: the same BatchNorm as x * a + (bias - mean * a)
    ... --batch 128          # compiles

Compiles the gradient of conv3x3(3->64) -> BatchNorm -> relu -> conv3x3(64->128,
stride 2) -> mean -> linear, batch 32 on one device, bf16 convolutions, BatchNorm
as flax's ``nnx.BatchNorm(dtype=bfloat16)`` computes it in training (statistics
and ``(x - mean) * scale * rsqrt(var + eps) + bias`` in float32, cast to bf16),
for a compile-only ``v6e:2x2`` device. libtpu dies in about 20 s with ``SIGSEGV
STACK OVERFLOW`` in ``xla::jellyfish::(anonymous
namespace)::MigrateInstructionUsers()`` recursing (called from
``MigrateAndInterleaveMatreses`` / ``PackSingleSequence`` /
``CombineSequencesToFitMxuSize`` of ``MxuAssigner::VisitRegion``, per the
library's symbols), top frame ``LloRegion::AppendInstruction()``. It compiles
for ``v5e:2x2`` and ``v4:2x2x1``, with ``--folded``, with 128 images per device,
without the stride 2, without BatchNorm after the first conv, and forward only;
float32 convolutions crash too. ``--xla_jf_pack_latches=false``,
``--xla_jf_conv_input_fusion=false``, ``--xla_jf_conv_output_fusion=false`` and
``--xla_tpu_allow_conv_input_fusion_with_downcast_convert=false`` (in
``LIBTPU_INIT_ARGS``) do not avoid it. The folded form is the same math (up to
float rounding); ood_jax's models use it for low-precision BatchNorm
(``ood_jax.models.layers.BatchNorm``).
"""

import argparse
import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax
import jax.numpy as jnp
from jax.experimental import topologies


def batch_norm(x, scale, bias, folded):
    xf = x.astype(jnp.float32)
    mean = xf.mean((0, 1, 2))
    var = jnp.maximum(0.0, (xf * xf).mean((0, 1, 2)) - mean * mean)
    a = jax.lax.rsqrt(var + 1e-5) * scale
    y = x * a + (bias - mean * a) if folded else (x - mean) * a + bias  # x bf16: f32 math
    return y.astype(jnp.bfloat16)


def loss(params, images, labels, folded):
    def conv(x, w, stride):
        x, w = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, w, (stride,) * 2, ((1, 1),) * 2, dimension_numbers=dims
        )

    x = jax.nn.relu(batch_norm(conv(images, params["w1"], 1), params["s"], params["b"], folded))
    x = jax.nn.relu(conv(x, params["w2"], 2))
    logits = x.astype(jnp.float32).mean((1, 2)) @ params["head"]
    return -(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, 10)).sum(-1).mean()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--topology", default="v6e:2x2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--folded", action="store_true")
    args = parser.parse_args()
    extra = {"chip_config_name": "megacore"} if args.topology.startswith("v4") else {}
    device = topologies.get_topology_desc(args.topology, "tpu", **extra).devices[0]
    sharding = jax.sharding.SingleDeviceSharding(device)
    spec = lambda *shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    params = {"w1": spec(3, 3, 3, 64), "s": spec(64), "b": spec(64)}
    params |= {"w2": spec(3, 3, 64, 128), "head": spec(128, 10)}
    images, labels = spec(args.batch, 32, 32, 3), spec(args.batch, dtype=jnp.int32)
    step = jax.jit(jax.grad(loss), static_argnums=3)
    print(f"compiling for {args.topology} (batch {args.batch}, folded={args.folded}) ...")
    step.lower(params, images, labels, args.folded).compile()  # v6e: SIGSEGV here
    print("compiled")


if __name__ == "__main__":
    main()
