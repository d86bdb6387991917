"""kernels.bias_act: the Triton kernel against `reference.ops.bias_act` (fp32, same inputs).

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1);
with one, on CUDA. Odd shapes, batch 1/3/8, channel counts that are no multiple of anything,
NCHW / NHWC / channels_last, fp32/fp16/bf16, lrelu/linear, gain, clamp.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from kernels import bias_act as ba  # noqa: E402
from kernels._triton import interpret_mode, jit_function  # noqa: E402
from kernels.ops import op  # noqa: E402
from triton_trace import trace_for, traces
from export.compare import assert_close  # noqa: E402

DEVICE = "cpu" if interpret_mode() else "cuda"
TOL_KEY = op("bias_act").tolerance  # the op table's key of export.compare.TOL
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 13, 7, 7), (3, 5, 13, 7), (8, 37, 3, 5)]  # the last spans 5 programs of 1024
ACTS = {
    "lrelu": dict(act="lrelu"),
    "lrelu-a0.1-g0.7-clamp1.5": dict(act="lrelu", alpha=0.1, gain=0.7, clamp=1.5),
    "linear": dict(act="linear"),
    "linear-g2-clamp0.75": dict(act="linear", gain=2.0, clamp=0.75),
}
COMPILE_SKIP = (
    "torch.compile cannot run a triton_op under TRITON_INTERPRET=1: @triton.jit then returns an "
    "InterpretedFunction, which torch.library.wrap_triton passes through unwrapped "
    "(torch/_library/triton.py), so Dynamo's fake-tensor pass launches the interpreter on FakeTensors "
    "('Cannot access data pointer of Tensor'). Needs CUDA; the captured graph is checked without the "
    "interpreter by test_triton_op_traces_to_the_kernel"
)


def _make(shape, layout, dtype, seed):
    """x `[N, C, H, W]` in `layout` and dtype, bias `[C]` in dtype, and the channel dim."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    b = torch.randn(shape[1], generator=g).to(dtype)
    if layout == "nhwc":
        x, dim = x.permute(0, 2, 3, 1).contiguous(), 3
    elif layout == "channels_last":
        x, dim = x.to(memory_format=torch.channels_last), 1
    else:
        dim = 1
    return x.to(dtype).to(DEVICE), b.to(DEVICE), dim


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_reference(dtype, shape, layout, act):
    x, b, dim = _make(shape, layout, dtype, seed=zlib.crc32(repr((shape, layout, act)).encode()))
    kw = ACTS[act]
    out = ba.bias_act(x, b, dim=dim, impl="triton", **kw)
    ref = ba.bias_act(x.float(), b.float(), dim=dim, impl="ref", **kw)  # fp32 reference, same values
    assert out.dtype == dtype and out.stride() == x.stride()
    assert_close(out, ref, TOL_KEY, str(dtype).split(".")[-1])
    if "clamp" in kw:
        assert float(out.float().abs().max()) <= kw["clamp"]


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_no_bias_negative_dim_and_2d(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 5, 11, generator=g).to(dtype).to(DEVICE)
    out = ba.bias_act(x, None, dim=-1, impl="triton")
    assert_close(out, ba.bias_act(x.float(), None, dim=-1), TOL_KEY, str(dtype).split(".")[-1])
    # [N, C] as the mapping network's EqualLinear(activation="fused_lrelu") uses it
    z = torch.randn(8, 37, generator=g).to(dtype).to(DEVICE)
    bz = torch.randn(37, generator=g).to(DEVICE)
    assert_close(ba.bias_act(z, bz, impl="triton"), ba.bias_act(z.float(), bz), TOL_KEY,
                 str(dtype).split(".")[-1])  # fmt: skip


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
def test_nan_and_inf_propagate_like_the_reference():
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 1.0, -1.0]], device=DEVICE)
    b = torch.zeros(5, device=DEVICE)
    for clamp in (None, 0.5):
        out = ba.bias_act(x, b, clamp=clamp, impl="triton")
        torch.testing.assert_close(out, ba.bias_act(x, b, clamp=clamp), equal_nan=True)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_bad_bias_or_act(impl):
    x = torch.randn(2, 5, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="bias must be"):
        ba.bias_act(x, torch.zeros(4, device=DEVICE), impl=impl)
    with pytest.raises(ValueError, match="act must be"):
        ba.bias_act(x, None, act="relu", impl=impl)


def test_triton_errors():
    x = torch.randn(2, 5, 4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="impl must be"):
        ba.bias_act(x, impl="cuda")
    with pytest.raises(ValueError, match="dim=4 is out of range"):
        ba.bias_act(x, dim=4, impl="triton")
    with pytest.raises(ValueError, match=r"dense x .*\.contiguous\(\)"):
        ba.bias_act(x[:, :, :, ::2], torch.zeros(5, device=DEVICE), impl="triton")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ba.bias_act(x.double(), impl="triton")
    with pytest.raises(ValueError, match="clamp must be >= 0"):
        ba.bias_act(x, clamp=-1.0, impl="triton")


@pytest.mark.gpu  # run on CUDA by python -m benchmarks.gpu_suite
@pytest.mark.skipif(interpret_mode(), reason=COMPILE_SKIP)
def test_torch_compile_fullgraph():
    x, b, _ = _make((3, 5, 13, 7), "nchw", torch.float16, seed=3)

    def f(x, b):
        return ba.bias_act(x, b, clamp=2.0, impl="triton") * 0.5

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, b)
    torch.testing.assert_close(out, f(x, b), rtol=0, atol=0)




@pytest.mark.slow
@traces("psp::bias_act", 'import kernels.bias_act as ba', 'lambda x, b: ba.bias_act(x, b, clamp=2.0, impl="triton")',
        'torch.randn(2, 3, 5, 5), torch.randn(3)')
def test_triton_op_traces_to_the_kernel(request):
    """Without the interpreter (the GPU path), `torch.compile(fullgraph=True)` traces the public
    op through `check_impl` and the custom op `psp::bias_act` down to its kernel launch
    (captured in AOTAutograd's forward graph, not run; one trace process for every op's test,
    `triton_trace.trace_for`)."""
    out = trace_for(request)
    assert "KERNELS ['_bias_act_kernel']" in out, out
    assert "triton_kernel_wrapper_functional" in out and "'HAS_CLAMP': True" in out, out



def test_aot_specs():
    specs = ba.aot_specs(1024)
    assert len(specs) == 9  # 4 px, then 8 .. 1024
    assert sum(s.calls for s in specs) == 17  # conv1 + 2 StyledConvs per level
    arg_names = jit_function(ba._bias_act_kernel).arg_names
    for s in specs:
        assert list(s.signature) == arg_names
        assert {k for k, v in s.signature.items() if v == "constexpr"} == set(s.constexprs)
        assert s.signature["x_ptr"] == "*fp16" and s.constexprs["LRELU"] is True
        assert s.layer.startswith(ba.NOT_USED) and s.flops > 0 and s.min_bytes > 0
    assert specs[-1].min_bytes == 4 * 32 * 1024 * 1024 + 4 * 32
    assert len(ba.aot_specs(256)) == 7
