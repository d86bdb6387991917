"""Triton kernels for StyleGAN2's hot path (fused modulated convolution, upfirdn2d, bias + leaky ReLU).

Each `kernels/<op>.py` exposes one public op whose `impl="ref"` calls the `reference/` op and whose
`impl="triton"` has the same arguments (house style: shared/docs/STYLE.md). Planned in issue 3.
"""
