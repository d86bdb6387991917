"""Fused StyleGAN2 modulated convolution: StyledConv and ToRGB as one implicit-GEMM Triton kernel.

Three public ops, each with an `impl="ref"` path composing `reference.ops` and an `impl="triton"`
path with the same arguments (house style: pairing rule):

  * `modulated_conv2d` - `reference.ops.modulated_conv2d` + `impl`;
  * `styled_conv2d`    - rosinality `StyledConv`: modulated conv -> `+ noise * noise_strength`
                         -> `+ bias[c]`, leaky ReLU(0.2) * sqrt(2) -> optional clamp;
  * `to_rgb`           - rosinality `ToRGB`: 1x1 modulated conv (no demodulation) + bias
                         + `upfirdn2d(skip, fir, up=2, padding=(2, 1, 2, 1))`.

and the torch helpers `polyphase_weights` / `upsample_conv2d_polyphase`, `pack_weight` and
`weight_sq`.

Caching (a generator should prepare these once per layer and pass them as keyword arguments):
`packed_weight=pack_weight(weight, up, fir, dtype)` (the kernel's weight operand, used as is)
and `wsq=weight_sq(weight)` (fp32 `[C_out, C_in]`). `poly_weight=polyphase_weights(weight, fir)`
is accepted too but still costs a repack per call. Without them each triton call recomputes them.

The Triton kernel (`_modulated_conv2d_kernel`) is one implicit GEMM per sample `n`:
`M` = output pixels (of one phase), `N` = `C_out`, `K` = `k*k*C_in` (tap-major, then input
channel). The weight is static (shared by every sample), the styles modulate the activations as
they are loaded (`x[n, ci, iy, ix] * styles[n, ci]`, fp32 product rounded to the activation dtype
for `tl.dot`), the accumulator is fp32, and the epilogue applies, in fp32: the per-(n, o) output
scale (demodulation), `+ noise * strength`, `+ bias`, leaky ReLU * sqrt(2), clamp, `+` the 2x
FIR-upsampled RGB skip, then one rounding to the activation dtype.

Upsampling (`up=2`): the stride-2 transposed 3x3 convolution followed by the 4x4 blur is linear with
a static weight, so it equals four 3x3 convolutions of the input, one per output phase
`(py, px)`, interleaved into the `2H x 2W` output (`polyphase_weights`). The kernel's grid has the
phase as part of its first axis: no zero insertion, no separate blur pass. Cost: each phase
kernel is a full 3x3 (the blur spreads the transposed conv's 2x2/2x1/1x2/1x1 phase taps), so the
packed weight is 4x the 3x3 weight and the MACs are 9*C_in*C_out per output pixel: 4x those of the
transposed conv itself (which then needs a separate blur pass over its output).

fp16 safety: the styles are divided by a per-sample power of two `2^ceil(log2 max|s|)` before
they touch the activations (exact in fp32), and that factor is folded into the fp32 output scale,
`scale[n, o] = rsqrt(sum_i s'[n,i]^2 wsq[o,i] + 1e-8 / smax[n]^2)` (= `smax * dcoefs`). So
`x * s'` never exceeds `|x|` and never underflows because styles are small, and the 1e-8
epsilon never meets fp16.

Layout: NCHW tensors with any strides are accepted (strides go to the kernel); the output has the
memory format of `x` (channels_last in, channels_last out). channels_last (NHWC memory) is the
fast layout on a GPU: the `K` axis (input channels) of the activation tile is then contiguous
(16-byte vector loads, `cp.async` pipelining), and so is the `N` axis of the output tile. The
kernel is told so through constexprs (`X_VEC`, `W_VEC`, `O_VEC`, `EVEN_K`, `EVEN_N`: contiguity
and alignment hints, masks dropped), so ahead-of-time builds get the same code as the JIT. Other
layouts (NCHW-contiguous, strided views) run the same kernel with element-wise gathers and tiles
capped at 64 x 64: correct, slower.

Precision: fp16/bf16 activations use tensor cores (`tl.dot` -> HMMA / HGMMA, fp32 accumulate);
fp32 activations use `input_precision="ieee"` (exact fp32 FMA, no TF32): fp32 is the
correctness path, fp16/bf16 the fast one. Block sizes: `conv_config` on a GPU (per layer, see
there); under Triton's CPU interpreter `interpreter_config` (whole layers per program: speed only).

Source: Karras et al., "Analyzing and Improving the Image Quality of StyleGAN" (CVPR 2020),
Sec. 2.2, Eqs. 1-3; computation as rosinality stylegan2-pytorch `model.py` (`ModulatedConv2d`,
`StyledConv`, `ToRGB`, `Blur`, `Upsample`), the layout official pSp checkpoints use. Kernel
structure after the Triton tutorials (`03-matrix-multiplication`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from torch._subclasses.fake_tensor import is_fake

from kernels._triton import KernelSpec, check_impl, interpret_mode
from reference import ops as ref_ops

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
EPS = 1e-8  # demodulation epsilon (official)
RGB_FIR_PAD = (2, 1, 2, 1)  # rosinality Upsample(factor=2) with a 4-tap kernel
_INT32_MAX = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# the kernel


@triton.jit
def _modulated_conv2d_kernel(
    # pointers
    x_ptr,  # [N, C_in, H, W] activations, any strides, fp32/fp16/bf16
    w_ptr,  # [PHASES, KS*KS*C_in, C_out] packed static weight, contiguous, dtype of x
    styles_ptr,  # [N, C_in] fp32 styles / smax[n], contiguous
    scale_ptr,  # [N, C_out] fp32 output scale (smax * dcoefs, or smax), contiguous
    noise_ptr,  # [N or 1, 1, H_out, W_out] noise (unused unless HAS_NOISE)
    strength_ptr,  # [1] fp32 noise strength (unused unless HAS_NOISE)
    bias_ptr,  # [C_out] fp32 (unused unless HAS_BIAS)
    skip_ptr,  # [N, C_out, H_out/2, W_out/2] RGB skip, any strides (unused unless HAS_SKIP)
    fir_ptr,  # [4, 4] fp32 upsampling FIR of the skip, contiguous (unused unless HAS_SKIP)
    out_ptr,  # [N, C_out, H_out, W_out] output, any strides, dtype of x
    # sizes
    C_in,
    C_out,
    H,  # input height
    W,  # input width
    HM,  # output rows per phase (H_out // UP)
    WM,  # output columns per phase (W_out // UP)
    H_skip,
    W_skip,
    # strides, in elements
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_on,
    stride_oc,
    stride_oh,
    stride_ow,
    stride_nn,  # 0 for a batch-1 noise broadcast over the batch
    stride_nh,
    stride_nw,
    stride_sn,
    stride_sc,
    stride_sh,
    stride_sw,
    # scalars
    clamp,  # |out| <= clamp (unused unless HAS_CLAMP)
    # meta-parameters
    KS: tl.constexpr,  # kernel size of each phase (3 for StyledConv, 1 for ToRGB)
    PAD: tl.constexpr,  # zero padding of the input (each phase)
    UP: tl.constexpr,  # 1, or 2: four phases interleaved into a 2x output
    HAS_NOISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LRELU: tl.constexpr,  # leaky ReLU(0.2) * sqrt(2)
    HAS_CLAMP: tl.constexpr,
    HAS_SKIP: tl.constexpr,  # + upfirdn2d(skip, fir, up=2, pad=(2, 1, 2, 1))
    DOT_PRECISION: tl.constexpr,  # "ieee" (fp32 activations) or "tf32" (ignored for fp16/bf16)
    EVEN_K: tl.constexpr,  # C_in % BLOCK_K == 0: no channel mask on the K axis
    EVEN_N: tl.constexpr,  # C_out % BLOCK_N == 0: no channel mask on the N axis
    X_VEC: tl.constexpr,  # x channels_last (stride_xc == 1), 16-byte aligned base and strides
    W_VEC: tl.constexpr,  # packed weight 16-byte aligned and C_out * itemsize % 16 == 0
    O_VEC: tl.constexpr,  # out channels_last (stride_oc == 1), 16-byte aligned base and strides
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # phase * m_blocks + m block
    pid_n = tl.program_id(1)
    n = tl.program_id(2)  # sample

    m_blocks = tl.cdiv(HM * WM, BLOCK_M)
    phase = pid_m // m_blocks
    pid_m = pid_m % m_blocks
    py = phase // UP
    px = phase % UP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] pixel of this phase
    m_mask = offs_m < HM * WM
    my = offs_m // WM
    mx = offs_m % WM
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channel
    n_mask = offs_n < C_out
    offs_k = tl.arange(0, BLOCK_K)  # [BK] input channel within a block

    x_base = x_ptr + n.to(tl.int64) * stride_xn
    w_base = w_ptr + phase * (KS * KS * C_in * C_out)
    s_base = styles_ptr + n * C_in

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_blocks = tl.cdiv(C_in, BLOCK_K)
    for kk in range(0, KS * KS * k_blocks):
        tap = kk // k_blocks
        ci = (kk % k_blocks) * BLOCK_K + offs_k  # [BK]
        k_mask = ci < C_in
        iy = my + (tap // KS - PAD)  # [BM]
        ix = mx + (tap % KS - PAD)
        pix_ok = m_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        a_ptrs = x_base + (iy * stride_xh + ix * stride_xw)[:, None] + ci[None, :] * stride_xc
        b_ptrs = w_base + (tap * C_in + ci)[:, None] * C_out + offs_n[None, :]
        if X_VEC:  # channels_last, 16-byte aligned: each row of the tile is BLOCK_K contiguous channels
            a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [16, 16]), [1, BLOCK_K])
        if W_VEC:  # C_out * itemsize % 16 == 0: each row of the weight tile starts 16-byte aligned
            b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [16, 16]), [1, BLOCK_N])
        if EVEN_K:
            a = tl.load(a_ptrs, mask=pix_ok[:, None], other=0.0)  # [BM, BK]
            s = tl.load(s_base + ci)  # [BK] fp32
        else:
            a = tl.load(a_ptrs, mask=pix_ok[:, None] & k_mask[None, :], other=0.0)
            s = tl.load(s_base + ci, mask=k_mask, other=0.0)
        a = (a.to(tl.float32) * s[None, :]).to(x_ptr.dtype.element_ty)  # modulate
        if EVEN_K and EVEN_N:
            b = tl.load(b_ptrs)  # [BK, BN]
        else:
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    # epilogue, fp32
    oy = my * UP + py  # [BM] output pixel
    ox = mx * UP + px
    scale = tl.load(scale_ptr + n * C_out + offs_n, mask=n_mask, other=0.0)
    acc = acc * scale[None, :]
    if HAS_NOISE:
        nz = tl.load(noise_ptr + n * stride_nn + oy * stride_nh + ox * stride_nw, mask=m_mask, other=0.0)
        acc = acc + (nz.to(tl.float32) * tl.load(strength_ptr))[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if LRELU:
        acc = tl.where(acc >= 0, acc, acc * 0.2) * 1.4142135623730951  # sqrt(2)
    if HAS_CLAMP:
        acc = tl.clamp(acc, -clamp, clamp, propagate_nan=tl.PropagateNan.ALL)
    if HAS_SKIP:
        # upfirdn2d(skip, fir, up=2, pad=(2, 1)): out[j] = sum_v fir[3-v] * zero_inserted[j+v-2];
        # only taps v = j%2 + 2a (a = 0, 1) hit a sample, skip[(j+v-2)/2]
        skip_base = skip_ptr + n.to(tl.int64) * stride_sn + offs_n[None, :] * stride_sc
        for ay in tl.static_range(2):
            vy = oy % 2 + 2 * ay
            sy = (oy + vy - 2) // 2  # exact: oy + vy is even
            for ax in tl.static_range(2):
                vx = ox % 2 + 2 * ax
                sx = (ox + vx - 2) // 2
                ok = m_mask & (sy >= 0) & (sy < H_skip) & (sx >= 0) & (sx < W_skip)
                f = tl.load(fir_ptr + (3 - vy) * 4 + (3 - vx), mask=m_mask, other=0.0)  # [BM]
                sk = tl.load(
                    skip_base + (sy * stride_sh + sx * stride_sw)[:, None],
                    mask=ok[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = acc + f[:, None] * sk.to(tl.float32)
    o_base = out_ptr + n.to(tl.int64) * stride_on
    o_ptrs = o_base + (oy * stride_oh + ox * stride_ow)[:, None] + offs_n[None, :] * stride_oc
    if O_VEC:  # channels_last, 16-byte aligned: each output row is BLOCK_N contiguous channels
        o_ptrs = tl.max_contiguous(tl.multiple_of(o_ptrs, [16, 16]), [1, BLOCK_N])
    if EVEN_N:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# block sizes


def conv_config(
    c_in: int, c_out: int, m_phase: int, dtype: torch.dtype = torch.float16, channels_last: bool = True
) -> dict[str, int]:
    """Block sizes and launch options for one layer: `BLOCK_M/N/K`, `num_warps`, `num_stages`.

    Chosen for the 1024 generator at batch 1 (`m_phase` = output pixels of one phase of one
    sample): big tiles (128 x min(C_out, 128)) where there are many pixels, small M tiles and
    narrow N tiles where there are few, so the 4..64 px layers (which stream their weights) still
    spread over many programs. `BLOCK_K` follows `C_in` (16..64). All dims are >= 16 (`tl.dot`).
    Every configuration the generator uses compiles to 0 spills on sm_80 and sm_90
    (`aot_specs`, `python -m kernels.inspect`).

    Args:
        c_in, c_out: channels.
        m_phase: output pixels per phase per sample (`H_out * W_out / up^2`).
        dtype: activation dtype (fp32, the correctness path, gets tiles of at most 64 x 64 x 32).
        channels_last: x is channels_last and 16-byte aligned (`X_VEC`). Otherwise the activation
            tile is gathered element by element (one 64-bit address each) and tiles are capped
            at 64 x 64 to stay clear of spills.
    """
    if m_phase >= 4096:
        block_m, n_cap = 128, 128
    elif m_phase >= 256:
        block_m, n_cap = 64, 64
    elif m_phase >= 64:
        block_m, n_cap = 32, 32
    else:
        block_m, n_cap = 16, 16
    if c_out <= 16:
        block_m = min(block_m, 64)  # ToRGB: the 4-tap skip gather of the epilogue costs ~80 registers
    block_n = max(16, min(n_cap, triton.next_power_of_2(c_out)))
    block_k = 64 if c_in >= 64 else (32 if c_in >= 32 else 16)
    if not channels_last:
        block_m, block_n = min(block_m, 64), min(block_n, 64)
    if dtype == torch.float32:  # FMA dot (ieee), 4-byte tiles: keep registers and shared memory in bounds
        block_m, block_n, block_k = min(block_m, 64), min(block_n, 64), min(block_k, 32)
    num_warps = 8 if block_m * block_n >= 128 * 128 else 4
    num_stages = 4 if block_m * block_n <= 32 * 32 else 3  # small tiles: more weight bytes in flight
    return {
        "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": num_warps, "num_stages": num_stages,
    }  # fmt: skip


def interpreter_config(c_in: int, c_out: int, m_phase: int) -> dict[str, int]:
    """Block sizes under Triton's interpreter: whole layers per program where possible.

    The interpreter runs programs one after another and costs ~5 ms per loop iteration whatever
    the tile size (numpy does the tile math), so the fastest tiles are the largest: up to
    512 channels x 512 channels, and as many pixels as Triton allows in one tile
    (`TRITON_MAX_TENSOR_NUMEL` elements of the `[BLOCK_M, BLOCK_N]` / `[BLOCK_M, BLOCK_K]` tiles:
    8192 pixels at 128 channels; the 256 px generator in 32 CPU-s instead of 56 with 1024).
    Numerics do not depend on the tiling beyond fp32 rounding (the summation order of numpy's
    matmul). The GPU tiles (`conv_config`) are exercised in the tests by patching this.
    """
    block_n = min(max(16, triton.next_power_of_2(c_out)), 512)
    block_k = min(max(16, triton.next_power_of_2(c_in)), 512)
    block_m = min(max(16, triton.next_power_of_2(m_phase)), tl.TRITON_MAX_TENSOR_NUMEL // max(block_n, block_k))
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 1}


# ----------------------------------------------------------------------------------------------
# precomputations (cache these in a generator)


def _fir_2d(fir: torch.Tensor, size: int, what: str) -> torch.Tensor:
    """`fir` as a `[size, size]` 2-D filter (a 1-D one used separably, as `reference.ops.upfirdn2d`)."""
    if fir.ndim == 1:
        fir = fir[:, None] * fir[None, :]
    if fir.ndim != 2 or tuple(fir.shape) != (size, size):
        raise ValueError(f"{what}: fir must be [{size}, {size}] (or [{size}] taps), got {tuple(fir.shape)}")
    return fir


def polyphase_weights(weight: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """The four phase kernels of the upsampling conv: transposed conv (stride 2) + FIR blur.

    Source: rosinality `model.py::ModulatedConv2d(upsample=True)` + `Blur(pad=(1, 1))` (the
    computation of `reference.ops.modulated_conv2d(up=2)`), rewritten as a polyphase
    decomposition. Per axis, with the transposed conv `y[2m + k] += x[m] W[k]` (weight not
    flipped) and the blur `z[j] = sum_t fir[t] y[j + K - 2 - t]` (true convolution, pad 1,
    `K = k + 1` taps):

        z[2M + p] = sum_d P_p[d] x[M + d],   P_p[d] = sum_{t, k: p + K - 2 - t - k = 2d} fir[t] W[k]

    for `d` in `[-(k//2), k//2]`, i.e. a k x k convolution with zero padding `k//2` per phase
    `p`. In 2-D the product runs over `(t_y, t_x)` of the 2-D `fir` (no separability assumed).

    Args:
        weight: `[C_out, C_in, k, k]` effective weight (odd `k`), as for `modulated_conv2d`.
        fir: `[k+1, k+1]` blur filter (the stored `blur.kernel`, already x4), or `[k+1]` taps.

    Returns:
        `[4, C_out, C_in, k, k]` phase kernels, phase `2*py + px` producing output pixels
        `(2*my + py, 2*mx + px)`; dtype `promote(weight, fir, float32)`.

    Raises:
        ValueError: a non-square or even `k`, or a `fir` of the wrong size.
    """
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"polyphase_weights: weight must be [C_out, C_in, k, k] with odd k, got {tuple(weight.shape)}")
    k = weight.shape[2]
    taps = k + 1
    dtype = torch.promote_types(torch.promote_types(weight.dtype, fir.dtype), torch.float32)
    f = _fir_2d(fir.to(device=weight.device, dtype=dtype), taps, "polyphase_weights")
    # sel[p, e, t, j] = 1 where tap t of the fir and tap j of the weight land on phase p, offset e - k//2
    p = torch.arange(2).view(2, 1, 1, 1)
    e = torch.arange(k).view(1, k, 1, 1)
    t = torch.arange(taps).view(1, 1, taps, 1)
    j = torch.arange(k).view(1, 1, 1, k)
    sel = (p + taps - 2 - t - j == 2 * (e - k // 2)).to(device=weight.device, dtype=dtype)  # [2, k, K, k]
    phases = torch.einsum("aetj,bfus,tu,oijs->aboief", sel, sel, f, weight.to(dtype))  # [2, 2, O, I, k, k]
    return phases.reshape(4, *weight.shape)


def upsample_conv2d_polyphase(x: torch.Tensor, weight: torch.Tensor, fir: torch.Tensor) -> torch.Tensor:
    """`upfirdn2d(conv_transpose2d(x, weight.T, stride=2), fir, pad=1)` as four interleaved k x k convs.

    Source: see `polyphase_weights` (rosinality `ModulatedConv2d(upsample=True)` + `Blur`).

    Args:
        x: `[N, C_in, H, W]` float activations (already modulated, if modulating).
        weight: `[C_out, C_in, k, k]` (odd `k`), used as the transposed conv's `[C_in, C_out, k, k]`.
        fir: `[k+1, k+1]` blur filter or `[k+1]` taps.

    Returns:
        `[N, C_out, 2H, 2W]`, dtype of `x`.

    Raises:
        ValueError: shape mismatches (see `polyphase_weights`).
    """
    if x.ndim != 4 or weight.ndim != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"upsample_conv2d_polyphase: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not agree "
            f"(x [N, C_in, H, W], weight [C_out, C_in, k, k])"
        )
    n, _, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[2]
    ph = polyphase_weights(weight, fir).to(x.dtype)  # [4, O, I, k, k]
    out = F.conv2d(x, ph.reshape(4 * c_out, *ph.shape[2:]), padding=k // 2)  # [N, (py px O), H, W]
    out = out.reshape(n, 2, 2, c_out, h, w).permute(0, 3, 4, 1, 5, 2)  # [N, O, H, py, W, px]
    return out.reshape(n, c_out, 2 * h, 2 * w)


def weight_sq(weight: torch.Tensor) -> torch.Tensor:
    """`wsq[o, i] = sum_k weight[o, i, k]^2` in fp32, for the demodulation coefficients (Eq. 3).

    Args:
        weight: `[C_out, C_in, k, k]` effective weight (the 3x3 one also for `up=2`).

    Returns:
        `[C_out, C_in]` float32.
    """
    return weight.float().square().sum(dim=[2, 3])


def pack_weight(
    weight: torch.Tensor, up: int = 1, fir: torch.Tensor | None = None, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """The Triton kernel's weight operand: `[PHASES, k*k*C_in, C_out]`, contiguous, in `dtype`.

    Row `(ey*k + ex)*C_in + ci`, column `co`: tap-major `K`, `N` contiguous. For `up=2` the four
    polyphase kernels (`polyphase_weights`, computed in fp32, rounded once to `dtype`).

    Args:
        weight: `[C_out, C_in, k, k]` effective weight.
        up: 1, or 2 (needs `fir`).
        fir: `[k+1, k+1]` blur filter (or `[k+1]` taps) for `up=2`.
        dtype: the activation dtype the kernel will run in.

    Returns:
        `[1 or 4, k*k*C_in, C_out]` tensor of `dtype` on `weight`'s device.

    Raises:
        ValueError: `up` not in {1, 2}, `up=2` without a fitting `fir`.
    """
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"pack_weight: weight must be [C_out, C_in, k, k], got {tuple(weight.shape)}")
    if up == 1:
        return _pack_phases(weight.float()[None], dtype)
    if up == 2:
        if fir is None:
            raise ValueError("pack_weight: up=2 needs the blur filter `fir`")
        return _pack_phases(polyphase_weights(weight.float(), fir.float()), dtype)
    raise ValueError(f"pack_weight: up must be 1 or 2, got {up}")


def _pack_phases(phases: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[P, C_out, C_in, k, k]` -> `[P, k*k*C_in, C_out]` contiguous in `dtype` (tap-major K, N contiguous)."""
    p, c_out, c_in, k, _ = phases.shape
    return phases.permute(0, 3, 4, 2, 1).reshape(p, k * k * c_in, c_out).to(dtype).contiguous()


# ----------------------------------------------------------------------------------------------
# launch (shared by the three custom ops)


def _out_scale(styles: torch.Tensor, wsq: torch.Tensor | None, c_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `(styles / smax, scale)`: `smax[n] = 2^ceil(log2 max_i |styles[n, i]|)` (exact scaling);
    `scale = rsqrt(s'^2 @ wsq.T + eps / smax^2)` (= `smax * dcoefs`) with `wsq`, else `smax`."""
    s = styles.float()
    amax = s.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)  # [N, 1]
    smax = torch.exp2(torch.ceil(torch.log2(amax)))
    s = (s / smax).contiguous()
    if wsq is None:
        return s, smax.expand(-1, c_out).contiguous()
    return s, torch.rsqrt(s.square() @ wsq.t() + EPS / smax.square()).contiguous()


def _empty_like_layout(x: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Output of `shape`, channels_last when `x` is channels_last (and not also NCHW-contiguous)."""
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=dtype, memory_format=fmt)


def _channels_vec(t: torch.Tensor) -> bool:
    """True when `t` `[N, C, H, W]` has unit channel stride and 16-byte aligned offsets and strides
    (channels_last storage): rows of C are then contiguous 16-byte vectors. PyTorch allocations are
    at least 64-byte aligned, so the storage offset decides (data_ptr() is not readable under
    torch.compile's fake tensors)."""
    v = 16 // t.element_size()
    return t.stride(1) == 1 and t.storage_offset() % v == 0 and all(t.stride(d) % v == 0 for d in (0, 2, 3))


def _launch(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    styles: torch.Tensor,
    wsq: torch.Tensor | None,
    up: int,
    padding: int,
    noise: torch.Tensor | None = None,
    noise_strength: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    lrelu: bool = False,
    clamp: float | None = None,
    skip: torch.Tensor | None = None,
    fir: torch.Tensor | None = None,
) -> torch.Tensor:
    """(2) allocate (3) launch `_modulated_conv2d_kernel`; arguments already checked by the public op."""
    n, c_in, h, w = x.shape
    phases, kdim, c_out = packed_weight.shape
    ks = math.isqrt(kdim // c_in)
    if up == 2:
        pad, hm, wm = ks // 2, h, w
    else:
        pad, hm, wm = padding, h + 2 * padding - ks + 1, w + 2 * padding - ks + 1
    out = _empty_like_layout(x, (n, c_out, hm * up, wm * up), x.dtype)
    s, scale = _out_scale(styles, wsq, c_out)
    x_vec = _channels_vec(x)
    if interpret_mode():
        cfg = interpreter_config(c_in, c_out, hm * wm)
    else:
        cfg = conv_config(c_in, c_out, hm * wm, x.dtype, x_vec)
    if noise is not None:
        stride_nn = 0 if noise.shape[0] == 1 else noise.stride(0)
        noise_strides = (stride_nn, noise.stride(2), noise.stride(3))
    else:
        noise_strides = (0, 0, 0)
    skip_strides = skip.stride() if skip is not None else (0, 0, 0, 0)
    skip_hw = (skip.shape[2], skip.shape[3]) if skip is not None else (0, 0)
    grid = (phases * triton.cdiv(hm * wm, cfg["BLOCK_M"]), triton.cdiv(c_out, cfg["BLOCK_N"]), n)
    if interpret_mode() and is_fake(x):
        # the fake (meta) kernel of the op under the interpreter: wrap_triton returns the eager
        # interpreted kernel there (no tracing HOP), which cannot run on fake tensors
        return out
    wrap_triton(_modulated_conv2d_kernel)[grid](
        x, packed_weight, s, scale,
        x if noise is None else noise,
        scale if noise_strength is None else noise_strength,
        scale if bias is None else bias,
        x if skip is None else skip,
        scale if fir is None else fir,
        out,
        c_in, c_out, h, w, hm, wm, *skip_hw,
        *x.stride(), *out.stride(), *noise_strides, *skip_strides,
        0.0 if clamp is None else clamp,
        KS=ks, PAD=pad, UP=up,
        HAS_NOISE=noise is not None, HAS_BIAS=bias is not None, LRELU=lrelu,
        HAS_CLAMP=clamp is not None, HAS_SKIP=skip is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        EVEN_K=c_in % cfg["BLOCK_K"] == 0, EVEN_N=c_out % cfg["BLOCK_N"] == 0,
        X_VEC=x_vec, O_VEC=_channels_vec(out),
        W_VEC=(c_out * x.element_size()) % 16 == 0 and packed_weight.storage_offset() * x.element_size() % 16 == 0,
        **cfg,
    )  # fmt: skip
    return out


@triton_op("psp::modulated_conv2d", mutates_args=())
def _modulated_conv2d_op(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    styles: torch.Tensor,
    wsq: torch.Tensor | None,
    up: int,
    padding: int,
) -> torch.Tensor:
    """`torch.ops.psp.modulated_conv2d`: demodulated iff `wsq` is given. Operands as prepared by
    `modulated_conv2d` (`pack_weight`, `weight_sq`, fp32 styles)."""
    return _launch(x, packed_weight, styles, wsq, up, padding)


@triton_op("psp::styled_conv2d", mutates_args=())
def _styled_conv2d_op(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    styles: torch.Tensor,
    wsq: torch.Tensor | None,
    noise: torch.Tensor | None,
    noise_strength: torch.Tensor | None,
    bias: torch.Tensor | None,
    up: int,
    clamp: float | None,
) -> torch.Tensor:
    """`torch.ops.psp.styled_conv2d`: modulated conv (demodulated iff `wsq` is given), noise, bias,
    leaky ReLU * sqrt(2), clamp. Operands as prepared by `styled_conv2d`."""
    ks = math.isqrt(packed_weight.shape[1] // x.shape[1])
    return _launch(x, packed_weight, styles, wsq, up, ks // 2, noise, noise_strength, bias, True, clamp)


@triton_op("psp::to_rgb", mutates_args=())
def _to_rgb_op(
    x: torch.Tensor,
    packed_weight: torch.Tensor,
    styles: torch.Tensor,
    bias: torch.Tensor,
    skip: torch.Tensor | None,
    fir: torch.Tensor | None,
) -> torch.Tensor:
    """`torch.ops.psp.to_rgb`: 1x1 modulated conv (no demodulation) + bias + the 2x FIR-upsampled
    skip. Operands as prepared by `to_rgb`."""
    return _launch(x, packed_weight, styles, None, 1, 0, bias=bias, skip=skip, fir=fir)


# ----------------------------------------------------------------------------------------------
# checks shared by the public ops


def _check_conv(op: str, x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: int,
                fir: torch.Tensor | None) -> None:
    """Shapes of x / weight / styles, `up`, and for `up=2` a fir."""
    if x.ndim != 4 or weight.ndim != 4 or styles.ndim != 2:
        raise ValueError(
            f"{op}: expected x [N, C_in, H, W], weight [C_out, C_in, k, k], styles [N, C_in]; got "
            f"{tuple(x.shape)}, {tuple(weight.shape)}, {tuple(styles.shape)}"
        )
    n, c_in = x.shape[:2]
    if weight.shape[1] != c_in or tuple(styles.shape) != (n, c_in) or weight.shape[2] != weight.shape[3]:
        raise ValueError(
            f"{op}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, styles {tuple(styles.shape)} do not "
            f"agree (expected weight [C_out, {c_in}, k, k], styles [{n}, {c_in}])"
        )
    if up not in (1, 2):
        raise ValueError(f"{op}: up must be 1 or 2, got {up}")
    if up == 2 and fir is None:
        raise ValueError(f"{op}: up=2 needs the blur filter `fir`")


def _check_triton_operands(
    op: str, x: torch.Tensor, weight: torch.Tensor, up: int, fir: torch.Tensor | None,
    wsq: torch.Tensor | None, packed_weight: torch.Tensor | None, demodulate: bool,
    poly_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dtype / size checks of the triton path; returns `(packed_weight, wsq)`, computed when not given
    (from `poly_weight` when that is given: a repack, cheaper than the polyphase computation)."""
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: x must be float32, float16 or bfloat16 for impl='triton', got {x.dtype}")
    c_out, c_in, k, _ = weight.shape
    if up == 2:
        if k % 2 == 0:
            raise ValueError(f"{op}: impl='triton' with up=2 needs an odd kernel size, got {k}")
        _fir_2d(fir, k + 1, op)  # the polyphase form needs a (k+1) x (k+1) blur (output 2H x 2W)
    if max(x[0].numel(), c_out * x.shape[2] * x.shape[3] * up * up) > _INT32_MAX or x.shape[0] > 65535:
        raise ValueError(f"{op}: impl='triton' indexes a sample with int32 and the batch on grid axis 2; "
                         f"x {tuple(x.shape)} is too large")
    phases = 4 if up == 2 else 1
    if poly_weight is not None:
        if up != 2 or tuple(poly_weight.shape) != (4, c_out, c_in, k, k):
            raise ValueError(
                f"{op}: poly_weight must be polyphase_weights(weight, fir) [4, {c_out}, {c_in}, {k}, {k}] with "
                f"up=2; got {tuple(poly_weight.shape)} with up={up}"
            )
        if packed_weight is None:
            packed_weight = _pack_phases(poly_weight, x.dtype)
    if packed_weight is None:
        packed_weight = pack_weight(weight, up, fir, x.dtype)
    elif tuple(packed_weight.shape) != (phases, k * k * c_in, c_out) or packed_weight.dtype != x.dtype:
        raise ValueError(
            f"{op}: packed_weight must be pack_weight(weight, up={up}, fir, {x.dtype}) of shape "
            f"[{phases}, {k * k * c_in}, {c_out}]; got {tuple(packed_weight.shape)} {packed_weight.dtype}"
        )
    packed_weight = packed_weight.contiguous()
    if not demodulate:
        return packed_weight, None
    if wsq is None:
        wsq = weight_sq(weight)
    elif tuple(wsq.shape) != (c_out, c_in):
        raise ValueError(f"{op}: wsq must be weight_sq(weight) [{c_out}, {c_in}], got {tuple(wsq.shape)}")
    return packed_weight, wsq.float()


# ----------------------------------------------------------------------------------------------
# public ops


def modulated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    demodulate: bool = True,
    up: int = 1,
    padding: int | None = None,
    fir: torch.Tensor | None = None,
    fused_modconv: bool = True,
    impl: str = "ref",
    *,
    wsq: torch.Tensor | None = None,
    packed_weight: torch.Tensor | None = None,
    poly_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """StyleGAN2 modulated convolution (modulate, demodulate, convolve; optional 2x upsampling).

    Source: Karras et al. 2020, Sec. 2.2, Eqs. 1-3; rosinality `model.py::ModulatedConv2d`.

    Args:
        x: `[N, C_in, H, W]` activations; for `impl="triton"` float32/float16/bfloat16, any strides
            (channels_last is the fast layout on a GPU).
        weight: `[C_out, C_in, k, k]` effective weight (the parameter times `1/sqrt(C_in*k*k)`).
        styles: `[N, C_in]` modulation (the affine of w); used in fp32.
        demodulate: apply demodulation (Eq. 3).
        up: 1 or 2 (2: transposed conv + blur; for `impl="triton"` the polyphase form).
        padding: convolution padding for `up=1`; default `k // 2`. Ignored for `up=2` (as the
            reference).
        fir: `[k+1, k+1]` blur filter for `up=2` (the stored `blur.kernel`, already x4).
        fused_modconv: selects the `impl="ref"` formulation (see `reference.ops.modulated_conv2d`);
            `impl="triton"` always modulates the activations (static weight, output-side
            demodulation), whatever this says.
        impl: `"ref"` (`reference.ops.modulated_conv2d`) or `"triton"`
            (`torch.ops.psp.modulated_conv2d`).
        wsq: optional cached `weight_sq(weight)` `[C_out, C_in]` fp32 (triton path only).
        packed_weight: optional cached `pack_weight(weight, up, fir, x.dtype)` (triton path only):
            the kernel's operand as is, no per-call work.
        poly_weight: optional cached `polyphase_weights(weight, fir)` `[4, C_out, C_in, k, k]` for
            `up=2` (triton path only): saves the polyphase computation, still repacked per call.

    Returns:
        `[N, C_out, H_out, W_out]` in the dtype of `x` (`2H x 2W` for `up=2`; for `impl="triton"`
        in the memory format of `x`).

    Raises:
        ValueError: unknown `impl`; shape mismatches, `up` not in {1, 2}, `up=2` without `fir`;
            for `impl="triton"` also an unsupported dtype, a negative padding, a fir not
            `[k+1, k+1]`, or cached operands of the wrong shape/dtype.
        KernelUnavailableError: `impl="triton"` where Triton cannot run (see `check_impl`).
    """
    check_impl("modulated_conv2d", impl, x, weight, styles)
    _check_conv("modulated_conv2d", x, weight, styles, up, fir)
    if impl == "ref":
        return ref_ops.modulated_conv2d(x, weight, styles, demodulate, up, padding, fir, fused_modconv)
    k = weight.shape[2]
    padding = k // 2 if padding is None else int(padding)
    if padding < 0 or (up == 1 and min(x.shape[2], x.shape[3]) + 2 * padding < k):
        raise ValueError(f"modulated_conv2d: padding {padding} gives an empty output for x {tuple(x.shape)}, k={k}")
    packed_weight, wsq = _check_triton_operands(
        "modulated_conv2d", x, weight, up, fir, wsq, packed_weight, demodulate, poly_weight
    )
    return torch.ops.psp.modulated_conv2d(x, packed_weight, styles.float(), wsq, up, padding)


def _strength_tensor(noise_strength: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(noise_strength, torch.Tensor):
        if noise_strength.numel() != 1:
            raise ValueError(
                f"noise_strength must be a float or a one-element tensor, got {tuple(noise_strength.shape)}"
            )
        return noise_strength.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(noise_strength), device=device, dtype=torch.float32)


def styled_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    noise: torch.Tensor | None = None,
    noise_strength: float | torch.Tensor = 0.0,
    bias: torch.Tensor | None = None,
    demodulate: bool = True,
    up: int = 1,
    fir: torch.Tensor | None = None,
    clamp: float | None = None,
    impl: str = "ref",
    *,
    wsq: torch.Tensor | None = None,
    packed_weight: torch.Tensor | None = None,
    poly_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """rosinality `StyledConv`: modulated conv -> `+ noise * noise_strength` -> bias, leaky ReLU * sqrt(2) -> clamp.

    Source: Karras et al. 2020, Sec. 2.2, Eqs. 1-3 (and Sec. 2 noise inputs); rosinality
    `model.py::StyledConv` (`ModulatedConv2d`, `NoiseInjection`, `FusedLeakyReLU`), padding `k//2`.

    Args:
        x: `[N, C_in, H, W]` activations; for `impl="triton"` float32/float16/bfloat16, any strides
            (channels_last is the fast layout on a GPU).
        weight: `[C_out, C_in, k, k]` effective weight (`conv.scale * conv.weight[0]`).
        styles: `[N, C_in]` modulation (`conv.modulation(w)`); used in fp32.
        noise: `[N or 1, 1, H_out, W_out]` noise, broadcast over channels (and over the batch
            when its batch is 1), or None.
        noise_strength: the `NoiseInjection.weight` (a float or a one-element tensor; pass the
            tensor to avoid a device->host sync).
        bias: `[C_out]` `FusedLeakyReLU.bias`, or None.
        demodulate: apply demodulation (Eq. 3).
        up: 1 or 2 (the level's first conv: transposed conv + blur, output `2H x 2W`).
        fir: `[k+1, k+1]` blur filter for `up=2` (`conv.blur.kernel`).
        clamp: clamp the output to `[-clamp, clamp]` after the activation; None: no clamp.
        impl: `"ref"` (`reference.ops.modulated_conv2d` + noise + `reference.ops.bias_act`) or
            `"triton"` (`torch.ops.psp.styled_conv2d`, one fused kernel).
        wsq: optional cached `weight_sq(weight)` (triton path only).
        packed_weight: optional cached `pack_weight(weight, up, fir, x.dtype)` (triton path only):
            the kernel's operand as is, no per-call work.
        poly_weight: optional cached `polyphase_weights(weight, fir)` for `up=2` (triton path
            only): saves the polyphase computation, still repacked per call.

    Returns:
        `[N, C_out, H*up, W*up]` in the dtype of `x` (triton: in the memory format of `x`).

    Raises:
        ValueError: unknown `impl`; shape mismatches (x / weight / styles / noise / bias), `up`
            not in {1, 2}, `up=2` without `fir`, a negative `clamp`; for `impl="triton"` also an
            unsupported dtype, a fir not `[k+1, k+1]` or cached operands of the wrong shape/dtype.
        KernelUnavailableError: `impl="triton"` where Triton cannot run (see `check_impl`).
    """
    check_impl("styled_conv2d", impl, x, weight, styles, noise, bias)
    _check_conv("styled_conv2d", x, weight, styles, up, fir)
    n, _, h, w = x.shape
    c_out, k = weight.shape[0], weight.shape[2]
    h_out, w_out = (2 * h, 2 * w) if up == 2 else (h + 2 * (k // 2) - k + 1, w + 2 * (k // 2) - k + 1)
    if noise is not None and (
        noise.ndim != 4 or noise.shape[0] not in (1, n) or tuple(noise.shape[1:]) != (1, h_out, w_out)
    ):
        raise ValueError(f"styled_conv2d: noise must be [{n} or 1, 1, {h_out}, {w_out}], got {tuple(noise.shape)}")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != c_out):
        raise ValueError(f"styled_conv2d: bias must be [{c_out}], got {tuple(bias.shape)}")
    if clamp is not None and clamp < 0:
        raise ValueError(f"styled_conv2d: clamp must be >= 0 or None, got {clamp}")
    if impl == "ref":
        out = ref_ops.modulated_conv2d(x, weight, styles, demodulate, up, fir=fir)
        if noise is not None:
            out = out + noise * noise_strength
        return ref_ops.bias_act(out, bias, act="lrelu", clamp=clamp).to(x.dtype)

    packed_weight, wsq = _check_triton_operands(
        "styled_conv2d", x, weight, up, fir, wsq, packed_weight, demodulate, poly_weight
    )
    strength = _strength_tensor(noise_strength, x.device) if noise is not None else None
    return torch.ops.psp.styled_conv2d(
        x, packed_weight, styles.float(), wsq, noise, strength,
        None if bias is None else bias.float(), up, None if clamp is None else float(clamp),
    )  # fmt: skip


def to_rgb(
    x: torch.Tensor,
    weight: torch.Tensor,
    styles: torch.Tensor,
    bias: torch.Tensor,
    skip: torch.Tensor | None = None,
    fir: torch.Tensor | None = None,
    impl: str = "ref",
    *,
    packed_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """rosinality `ToRGB`: 1x1 modulated conv without demodulation + bias + the 2x upsampled skip.

    Source: Karras et al. 2020, Sec. 2.2 (Eqs. 1-2, no demodulation) and Sec. 4.1 (skip
    generator); rosinality `model.py::ToRGB` (`Upsample`: `upfirdn2d(up=2, pad=(2, 1))`).

    Args:
        x: `[N, C_in, H, W]` activations; for `impl="triton"` float32/float16/bfloat16, any strides.
        weight: `[C_out, C_in, 1, 1]` effective weight (`conv.scale * conv.weight[0]`; C_out = 3).
        styles: `[N, C_in]` modulation (`conv.modulation(w)`); used in fp32.
        bias: `[1, C_out, 1, 1]` (as stored) or `[C_out]`.
        skip: `[N, C_out, H/2, W/2]` image of the previous level, or None (the 4 px ToRGB).
        fir: `[4, 4]` upsampling filter of the skip (`upsample.kernel`, already x4), or `[4]`
            taps; required with `skip`.
        impl: `"ref"` (`reference.ops.modulated_conv2d`, `bias_act`, `upfirdn2d`) or `"triton"`
            (`torch.ops.psp.to_rgb`: the skip upsampling fused into the epilogue).
        packed_weight: optional cached `pack_weight(weight, 1, None, x.dtype)` (triton path only).

    Returns:
        `[N, C_out, H, W]` in the dtype of `x` (triton: in the memory format of `x`).

    Raises:
        ValueError: unknown `impl`; shape mismatches (x / weight / styles / bias / skip), a
            weight that is not 1x1, `skip` without a `[4, 4]` `fir`; for `impl="triton"` also an
            unsupported dtype or a cached operand of the wrong shape/dtype.
        KernelUnavailableError: `impl="triton"` where Triton cannot run (see `check_impl`).
    """
    check_impl("to_rgb", impl, x, weight, styles, bias, skip)
    _check_conv("to_rgb", x, weight, styles, 1, None)
    n, _, h, w = x.shape
    c_out = weight.shape[0]
    if weight.shape[2] != 1:
        raise ValueError(f"to_rgb: weight must be 1x1 [C_out, C_in, 1, 1], got {tuple(weight.shape)}")
    if bias.numel() != c_out or bias.ndim not in (1, 4) or bias.shape[-1 if bias.ndim == 1 else 1] != c_out:
        raise ValueError(f"to_rgb: bias must be [1, {c_out}, 1, 1] or [{c_out}], got {tuple(bias.shape)}")
    if skip is not None:
        if tuple(skip.shape) != (n, c_out, h // 2, w // 2) or h % 2 or w % 2:
            raise ValueError(
                f"to_rgb: skip must be [{n}, {c_out}, H/2, W/2] for x {tuple(x.shape)}, got {tuple(skip.shape)}"
            )
        if fir is None:
            raise ValueError("to_rgb: a skip needs its upsampling filter `fir` ([4, 4], upsample.kernel)")
        _fir_2d(fir, 4, "to_rgb")
    if impl == "ref":
        out = ref_ops.modulated_conv2d(x, weight, styles, demodulate=False)
        out = ref_ops.bias_act(out, bias.reshape(c_out), act="linear")
        if skip is not None:
            out = out + ref_ops.upfirdn2d(skip, fir, up=2, padding=RGB_FIR_PAD)
        return out.to(x.dtype)

    packed_weight, _ = _check_triton_operands("to_rgb", x, weight, 1, None, None, packed_weight, False)
    fir2 = None if skip is None else _fir_2d(fir, 4, "to_rgb").to(device=x.device, dtype=torch.float32).contiguous()
    return torch.ops.psp.to_rgb(x, packed_weight, styles.float(), bias.reshape(c_out).float(), skip, fir2)


# ----------------------------------------------------------------------------------------------
# ahead-of-time configurations for `python -m kernels.inspect`

# rosinality 1024 generator: channels per resolution (channel_multiplier=2)
GENERATOR_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128, 512: 64, 1024: 32}

_SIZE_ARGS = ("C_in", "C_out", "H", "W", "HM", "WM", "H_skip", "W_skip")


def signature(dtype: str = "fp16", unit_strides: tuple[str, ...] = ()) -> dict[str, str]:
    """`ASTSource` signature of `_modulated_conv2d_kernel` for activations of `dtype`.

    Args:
        dtype: "fp16", "bf16" or "fp32" (x, weight, noise, skip, out).
        unit_strides: stride arguments equal to 1 at run time, which Triton's JIT specializes to
            the constant 1 (e.g. `stride_xc` for channels_last); marked "constexpr".
    """
    sig = {
        "x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "styles_ptr": "*fp32", "scale_ptr": "*fp32",
        "noise_ptr": f"*{dtype}", "strength_ptr": "*fp32", "bias_ptr": "*fp32", "skip_ptr": f"*{dtype}",
        "fir_ptr": "*fp32", "out_ptr": f"*{dtype}",
    }  # fmt: skip
    sig.update({a: "i32" for a in _SIZE_ARGS})
    for t, dims in (("x", "nchw"), ("o", "nchw"), ("n", "nhw"), ("s", "nchw")):
        for d in dims:
            name = f"stride_{t}{d}"
            sig[name] = "constexpr" if name in unit_strides else "i32"
    sig["clamp"] = "fp32"
    for c in ("KS", "PAD", "UP", "HAS_NOISE", "HAS_BIAS", "LRELU", "HAS_CLAMP", "HAS_SKIP", "DOT_PRECISION",
              "EVEN_K", "EVEN_N", "X_VEC", "W_VEC", "O_VEC", "BLOCK_M", "BLOCK_N", "BLOCK_K"):
        sig[c] = "constexpr"
    return sig


def aot_specs(output_size: int = 1024) -> list[KernelSpec]:
    """Every `_modulated_conv2d_kernel` configuration of a generator of `output_size`: fp16, batch 1.

    Layers (rosinality 1024 generator, channel_multiplier 2): `conv1` (4 px 512->512), per level
    `r` = 8..output_size the up StyledConv `convs[2k-2]`, the StyledConv `convs[2k-1]` and the
    ToRGB `to_rgbs[k-1]`, plus `to_rgb1` at 4 px (no skip). Activations channels_last (NHWC
    memory, the fast layout): the channel strides of x / out / skip and the noise's column
    stride are 1, which Triton's JIT turns into the constant 1, so they are constexprs here;
    batch-1 noise is broadcast (`stride_nn = 0`).

    `flops` = 2*M*N*K of the GEMM the kernel runs (M = output pixels, N = C_out, K = C_in*k*k;
    for ToRGB N = 3, the useful work). `min_bytes` = compulsory fp16 traffic: input, the packed
    weight the kernel reads (4x the 3x3 weight for an up conv: four polyphase kernels), output,
    noise (once), skip (ToRGB), plus the fp32 styles / scale / bias.

    Args:
        output_size: generator resolution, a power of two in [4, 1024].

    Returns:
        One `KernelSpec` per layer (`calls=1`; identical configurations compile once).

    Raises:
        ValueError: `output_size` not a generator resolution.
    """
    if output_size not in GENERATOR_CHANNELS:
        raise ValueError(f"output_size must be one of {sorted(GENERATOR_CHANNELS)}, got {output_size}")
    unit = ("stride_xc", "stride_oc", "stride_nw", "stride_sc")
    sig = signature("fp16", unit)
    specs = []

    def conv_spec(name: str, layer: str, c_in: int, c_out: int, r: int, up: int) -> KernelSpec:
        ks, phases = 3, (4 if up == 2 else 1)
        cfg = conv_config(c_in, c_out, r * r // (up * up))
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = dict(cfg, KS=ks, PAD=1, UP=up, HAS_NOISE=True, HAS_BIAS=True, LRELU=True, HAS_CLAMP=False,
                      HAS_SKIP=False, DOT_PRECISION="tf32", EVEN_K=c_in % cfg["BLOCK_K"] == 0,
                      EVEN_N=c_out % cfg["BLOCK_N"] == 0, X_VEC=True, W_VEC=True, O_VEC=True)
        consts.update({s: 1 for s in unit})
        r_in = r // up
        nbytes = 2.0 * (c_in * r_in * r_in + phases * ks * ks * c_in * c_out + c_out * r * r + r * r)
        nbytes += 4.0 * (c_in + 2 * c_out)
        return KernelSpec(
            kernel=f"_modulated_conv2d_kernel[{name} {c_in}->{c_out} {'up2 ' if up == 2 else ''}{r}px]",
            fn=_modulated_conv2d_kernel, signature=sig, constexprs=consts, **launch,
            flops=2.0 * r * r * c_out * c_in * ks * ks, min_bytes=nbytes, layer=layer, calls=1,
        )  # fmt: skip

    def rgb_spec(layer: str, c_in: int, r: int, skip: bool) -> KernelSpec:
        cfg = conv_config(c_in, 3, r * r)
        launch = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        consts = dict(cfg, KS=1, PAD=0, UP=1, HAS_NOISE=False, HAS_BIAS=True, LRELU=False, HAS_CLAMP=False,
                      HAS_SKIP=skip, DOT_PRECISION="tf32", EVEN_K=c_in % cfg["BLOCK_K"] == 0, EVEN_N=False,
                      X_VEC=True, W_VEC=False, O_VEC=False)  # 3 output channels: 6-byte rows
        consts.update({s: 1 for s in unit})
        nbytes = 2.0 * (c_in * r * r + 3 * c_in + 3 * r * r + (3 * r * r // 4 if skip else 0)) + 4.0 * (c_in + 6 + 16)
        return KernelSpec(
            kernel=f"_modulated_conv2d_kernel[to_rgb {c_in}->3 {r}px{' +skip' if skip else ''}]",
            fn=_modulated_conv2d_kernel, signature=sig, constexprs=consts, **launch,
            flops=2.0 * r * r * 3 * c_in, min_bytes=nbytes, layer=layer, calls=1,
        )  # fmt: skip

    c4 = GENERATOR_CHANNELS[4]
    specs.append(conv_spec("styled_conv", "conv1 (4px)", c4, c4, 4, 1))
    specs.append(rgb_spec("to_rgb1 (4px)", c4, 4, False))
    c_prev, level = c4, 0
    for r, c in GENERATOR_CHANNELS.items():
        if r == 4 or r > output_size:
            continue
        specs.append(conv_spec("styled_conv", f"convs.{2 * level} (up, {r}px)", c_prev, c, r, 2))
        specs.append(conv_spec("styled_conv", f"convs.{2 * level + 1} ({r}px)", c, c, r, 1))
        specs.append(rgb_spec(f"to_rgbs.{level} ({r}px)", c, r, True))
        c_prev, level = c, level + 1
    return specs
