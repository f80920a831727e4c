"""The compile-only GPU planner's own parsing (experiments.plan.gpu).

A real compile needs ``jax-cuda12-plugin`` (about 480 MB), which CI does not install;
``python -m experiments.plan.gpu`` is run by hand (README, "Scale").
"""

from experiments.plan import gpu as gpu_plan

# The shape of a compiled GPU program's text: operands by name only.
HLO = """
ENTRY %main (p0: bf16[4,8,8,3], p1: bf16[16,3,3,3]) -> f32[4,8,8,16] {
  %p0 = bf16[4,8,8,3]{3,2,1,0} parameter(0)
  %p1 = bf16[16,3,3,3]{3,2,1,0} parameter(1)
  %cudnn-conv.1 = (bf16[4,8,8,16]{3,2,1,0}, u8[4096]{0}) custom-call(%p0, %p1), \
window={size=3x3 pad=1_1x1_1}, custom_call_target="__cudnn$convForward"
  %gte = bf16[4,8,8,16]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %gemm = (f32[16,16]{1,0}, s8[64]{0}) custom-call(%p1, %p1), custom_call_target="__cublas$gemm"
  ROOT %fusion = f32[4,8,8,16]{3,2,1,0} fusion(%gte), kind=kLoop, calls=%fused
}
"""


def test_custom_call_bytes_counts_operands_and_results_by_hand():
    image, kernel, conv = 4 * 8 * 8 * 3 * 2, 16 * 3 * 3 * 3 * 2, 4 * 8 * 8 * 16 * 2
    gemm = 2 * kernel + 16 * 16 * 4
    # The u8/s8 scratch buffers, the get-tuple-element and the fusion are not counted.
    assert gpu_plan.custom_call_bytes(HLO) == image + kernel + conv + gemm
