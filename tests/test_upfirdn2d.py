"""kernels.upfirdn2d: the Triton kernel against `reference.ops.upfirdn2d` (fp32, same inputs).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with one, on CUDA. Every up/down in {1, 2}^2 x paddings (int, [px, py], [x0, x1, y0, y1],
negative = crop, asymmetric) x filters (symmetric 4x4, asymmetric 3x5 so the flip matters,
asymmetric 1-D taps used separably), odd sizes, batch 1/3/8, gains; fp32 and fp16 (bf16 for the
two StyleGAN2 uses); strided inputs.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

pytest.importorskip("triton")

from kernels import upfirdn2d as ud  # noqa: E402
from kernels._triton import interpret_mode, jit_function  # noqa: E402
from kernels.ops import op  # noqa: E402
from reference.ops import setup_filter  # noqa: E402
from triton_trace import trace_for, traces
from export.compare import assert_close  # noqa: E402

DEVICE = "cpu" if interpret_mode() else "cuda"
TOL_KEY = op("upfirdn2d").tolerance  # the op table's key of export.compare.TOL
FILTERS = {
    "blur4": setup_filter([1, 3, 3, 1], gain=4),  # 2-D, symmetric (StyleGAN2's)
    "asym3x5": torch.rand(3, 5, generator=torch.Generator().manual_seed(7)) + 0.1,  # 2-D: the flip matters
    "taps3": torch.tensor([1.0, 2.0, 5.0]),  # 1-D, asymmetric: used separably, flipped on both axes
}
PADDINGS = [0, [1, 2], (1, 1, 1, 1), (2, 1, 2, 1), (3, 0, -1, 2), (-2, 1, 0, -1)]
SHAPES = [(1, 3, 7, 13), (3, 5, 13, 7), (8, 3, 7, 7)]
GAINS = [1.0, 0.5, 2.0]


def _cases():
    """(up, down, padding, filter, shape, gain) over the full product of factors, paddings and
    filters; shapes and gains cycle. Combinations with an empty output are left out."""
    out = []
    for i, (up, down, pad, fname) in enumerate(itertools.product([1, 2], [1, 2], PADDINGS, FILTERS)):
        shape = SHAPES[i % len(SHAPES)]
        f = FILTERS[fname]
        kh, kw = (f.shape[0], f.shape[0]) if f.ndim == 1 else tuple(f.shape)
        x0, x1, y0, y1 = (pad,) * 4 if isinstance(pad, int) else (pad[0], pad[0], pad[1], pad[1]) if len(pad) == 2 else pad
        if (shape[2] * up + y0 + y1 - kh) // down + 1 < 1 or (shape[3] * up + x0 + x1 - kw) // down + 1 < 1:
            continue
        out.append(pytest.param(up, down, pad, fname, shape, GAINS[i % len(GAINS)],
                                id=f"up{up}-down{down}-pad{pad}-{fname}-{'x'.join(map(str, shape))}"))  # fmt: skip
    return out


def _x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("up, down, pad, fname, shape, gain", _cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_matches_reference(dtype, up, down, pad, fname, shape, gain):
    x = _x(shape, dtype, seed=zlib.crc32(repr((up, down, str(pad), fname)).encode()))
    fir = FILTERS[fname].to(DEVICE)
    out = ud.upfirdn2d(x, fir, up, down, pad, gain, impl="triton")
    ref = ud.upfirdn2d(x.float(), fir, up, down, pad, gain, impl="ref")  # fp32 reference, same values
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, ref, TOL_KEY, str(dtype).split(".")[-1])


# the two StyleGAN2 uses: Blur after the transposed conv, ToRGB skip Upsample
USES = {"blur": dict(up=1, padding=(1, 1, 1, 1)), "skip_upsample": dict(up=2, padding=(2, 1, 2, 1))}


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (3, 13, 9, 9), (8, 3, 13, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_stylegan2_uses(dtype, use, shape):
    x = _x(shape, dtype, seed=zlib.crc32(repr((use, shape)).encode()))
    fir = FILTERS["blur4"].to(DEVICE)
    out = ud.upfirdn2d(x, fir, impl="triton", **USES[use])
    ref = ud.upfirdn2d(x.float(), fir, **USES[use])
    n, c, h, w = shape
    assert out.shape == ((n, c, h - 1, w - 1) if use == "blur" else (n, c, 2 * h, 2 * w))
    assert_close(out, ref, TOL_KEY, str(dtype).split(".")[-1])


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_input(layout):
    x = _x((3, 5, 13, 14), torch.float32, seed=5)
    x = x.to(memory_format=torch.channels_last) if layout == "channels_last" else x[:, 1:4, ::2, 1::2]
    fir = FILTERS["asym3x5"].to(DEVICE)
    out = ud.upfirdn2d(x, fir, up=2, down=1, padding=(2, 1, 3, 0), impl="triton")
    assert_close(out, ud.upfirdn2d(x.contiguous(), fir, up=2, down=1, padding=(2, 1, 3, 0)), TOL_KEY)


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
def test_separable_equals_outer_product():
    x = _x((3, 5, 9, 11), torch.float32, seed=9)
    k = torch.tensor([1.0, 2.0, 5.0], device=DEVICE)
    sep = ud.upfirdn2d(x, k, up=2, down=2, padding=1, gain=3.0, impl="triton")
    full = ud.upfirdn2d(x, k[:, None] * k[None, :], up=2, down=2, padding=1, gain=3.0, impl="triton")
    torch.testing.assert_close(sep, full, rtol=0, atol=0)


def test_errors():
    x = _x((2, 3, 8, 8), torch.float32, seed=0)
    fir = FILTERS["blur4"].to(DEVICE)
    with pytest.raises(ValueError, match="impl must be"):
        ud.upfirdn2d(x, fir, impl="cuda")
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        ud.upfirdn2d(x[0], fir, impl="triton")
    with pytest.raises(ValueError, match="up, down in"):
        ud.upfirdn2d(x, fir, up=4, impl="triton")
    with pytest.raises(ValueError, match="fir must be"):
        ud.upfirdn2d(x, fir[None], impl="triton")
    with pytest.raises(ValueError, match="padding must be"):
        ud.upfirdn2d(x, fir, padding=(1, 2, 3), impl="triton")
    with pytest.raises(ValueError, match="output would be empty"):
        ud.upfirdn2d(x, fir, padding=(-4, -4, 0, 0), impl="triton")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ud.upfirdn2d(x.double(), fir, impl="triton")


COMPILE_SKIP = (
    "torch.compile cannot run a triton_op under TRITON_INTERPRET=1: @triton.jit then returns an "
    "InterpretedFunction, which torch.library.wrap_triton passes through unwrapped "
    "(torch/_library/triton.py), so Dynamo's fake-tensor pass launches the interpreter on FakeTensors "
    "('Cannot access data pointer of Tensor'). Needs CUDA; the captured graph is checked without the "
    "interpreter by test_triton_op_traces_to_the_kernel"
)


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.skipif(interpret_mode(), reason=COMPILE_SKIP)
def test_torch_compile_fullgraph():
    x = _x((3, 5, 13, 7), torch.float16, seed=3)
    fir = FILTERS["blur4"].to(DEVICE)

    def f(x):
        return ud.upfirdn2d(x, fir, up=2, padding=(2, 1, 2, 1), impl="triton") + 1

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out, f(x), rtol=0, atol=0)




@traces("psp::upfirdn2d", 'import kernels.upfirdn2d as ud',
        'lambda x, fir: ud.upfirdn2d(x, fir, up=2, padding=(2, 1, 2, 1), impl="triton")',
        'torch.randn(1, 3, 8, 8), torch.tensor([1.0, 3.0, 3.0, 1.0])')
def test_triton_op_traces_to_the_kernel(request):
    """Without the interpreter (the GPU path), `torch.compile(fullgraph=True)` traces the public
    op through `check_impl` and the custom op `psp::upfirdn2d` down to its kernel launch
    (captured in AOTAutograd's forward graph, not run; one trace process for every op's test,
    `triton_trace.trace_for`)."""
    out = trace_for(request)
    assert "KERNELS ['_upfirdn2d_kernel']" in out, out
    assert "triton_kernel_wrapper_functional" in out and "'UP': 2" in out, out



def test_aot_specs():
    specs = ud.aot_specs(1024)
    assert len(specs) == 16  # skip upsample and blur at 8 .. 1024
    arg_names = jit_function(ud._upfirdn2d_kernel).arg_names
    for s in specs:
        assert list(s.signature) == arg_names
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(s.constexprs)
        assert s.signature["x_ptr"] == "*fp16" and s.constexprs["stride_xw"] == 1
        assert s.layer.startswith(ud.NOT_USED) and s.flops > 0 and s.min_bytes > 0 and s.calls == 1
    skip_1024 = specs[7]
    assert "512->1024" in skip_1024.layer and skip_1024.constexprs["UP"] == 2
    assert skip_1024.min_bytes == 2 * 3 * (512 * 512 + 1024 * 1024) + 4 * 16
    blur_8 = specs[8]
    assert blur_8.constexprs["UP"] == 1 and blur_8.constexprs["pad_x0"] == 1  # pad 1: specialized by the JIT
    assert len(ud.aot_specs(256)) == 12
