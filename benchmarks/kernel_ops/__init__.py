"""One benchmark per Triton op, a module named after the op (the op table's `benchmark`, kernels/ops.py).

Each module offers `cases(output_size, batch) -> list[Case]` (the op at every layer shape of a
generator of `output_size`, forward order) and `impls(case, device, dtype, seed, impls)` (the
inputs and one zero-argument callable per implementation: `triton`, `ref`, `official`). The runner
that times them and its CLI: `python -m benchmarks.gpu_kernels`. What the cases share (the `Case`
record, the official formulations of rosinality stylegan2-pytorch): `benchmarks.kernel_ops.common`.
"""
