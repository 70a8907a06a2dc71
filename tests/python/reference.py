"""Test cases, their inputs, the fp64 reference and the error bound it must meet.

A Case describes one collective call; make_inputs(case, rank) gives rank
`rank`'s arguments, the same in the rank that calls the operator and in the
test process that computes the reference.

The error bound (error_bound) follows from how the contract computes:

  each rank r accumulates its partial a_r in fp32 over its k products plus
  bias and x3 (plus, in the quantized modes, the rounding of the dequantized
  weight or of the int32 accumulator, the scale product and the x3 add):
      |a_r - P_r| <= g * S_r,        g = (k + 3) * u32,  u32 = 2^-24
  where P_r is the exact partial and S_r the sum of the magnitudes of its
  terms; a_r is rounded to the output dtype (unit roundoff u_out = 2^-11 for
  f16, 2^-8 for bf16; eta_out = half the smallest subnormal step is the
  absolute error of a result in the subnormal range):
      |q_r - a_r| <= u_out * |a_r| + eta_out
  the p rounded partials are summed in fp32 (at most (p - 1) roundings) and
  the sum s is rounded once more to the output dtype:
      |s - sum q_r| <= (p - 1) * u32 * sum |q_r|,  |out - s| <= u_out * |s| + eta_out.
  With A = sum_r |P_r| <= S = sum_r S_r and F = (k + 3 + p) * u32 * S, the
  first-order total is
      |out - sum_r P_r| <= 2 * u_out * (A + F) + F + (p + 1) * eta_out,
  and the terms of second order (products of two roundoffs) are below 1% of
  it (u_out <= 2^-8), hence the factor 1.01. The fp64 reference itself errs
  by less than (k + 3) * 2^-53 * S, which is 2^-29 of F.

  With bf16 activations the engine may be AVX512-BF16's dot product: in
  weight-only mode the weight is dequantized into bf16, one more rounding
  of each weight (2^-8 * S more in F), and a subnormal fp32 sum flushes to
  zero (k * 2^-126 more). (Subnormal operands count as zero in every
  engine; these inputs have none.)
"""
import dataclasses
import math

import torch

U32 = 2.0 ** -24
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
HALF_SUBNORMAL_STEP = {torch.float16: 2.0 ** -25, torch.bfloat16: 2.0 ** -134}
SECOND_ORDER = 1.01


@dataclasses.dataclass(frozen=True)
class Case:
    mode: str = "plain"            # plain | weight_quant | full_quant
    dtype: torch.dtype = torch.float16   # x1's dtype; in full_quant, the output's
    m: int = 24
    batch: int = 0                 # 0: x1 is [m, k]; b > 0: x1 is [b, m // b, k]
    k: int = 64
    uneven_k: bool = False         # rank r's k is k + 16 * r
    n: int = 40
    bias: bool = False
    x3: bool = False
    scale: str = "per_channel"     # per_tensor | per_channel | per_channel_2d | per_group
    offset: bool = False
    group_size: int = 0
    x2_transposed: bool = False    # x2 is the transpose of a row-major [n, k]
    comm_turn: int = 0
    seed: int = 1

    def k_of(self, rank):
        return self.k + (16 * rank if self.uneven_k else 0)

    def out_shape(self):
        if self.batch:
            return (self.batch, self.m // self.batch, self.n)
        return (self.m, self.n)

    def __str__(self):
        fields = [self.mode, str(self.dtype).replace("torch.", ""), "3-D" if self.batch else "2-D"]
        if self.mode != "plain":
            fields.append(self.scale + (f"(G={self.group_size})" if self.group_size else ""))
        fields += [flag for flag in ("bias", "x3", "offset", "x2_transposed", "uneven_k")
                   if getattr(self, flag)]
        if self.comm_turn:
            fields.append(f"comm_turn={self.comm_turn}")
        return "-".join(fields)


def _randn(generator, shape, dtype):
    return torch.randn(shape, generator=generator).to(dtype)


def _scale_shape(case, k):
    if case.scale == "per_tensor":
        return (1,)
    if case.scale == "per_channel":
        return (case.n,)
    if case.scale == "per_channel_2d":
        return (1, case.n)
    return (math.ceil(k / case.group_size), case.n)


def pack_dequant_scale(scale32):
    """torch_npu's packing, written out here so the test does not trust the op it tests."""
    return (scale32.view(torch.int32).to(torch.int64) & 0xFFFFE000) | (1 << 46)


def make_inputs(case, rank):
    """(x1, x2, keyword arguments) of rank `rank`, deterministic in (case, rank)."""
    generator = torch.Generator().manual_seed(1009 * case.seed + rank)
    k = case.k_of(rank)
    x1_shape = (case.batch, case.m // case.batch, k) if case.batch else (case.m, k)
    kwargs = {"comm_turn": case.comm_turn}
    if case.mode == "full_quant":
        x1 = torch.randint(-128, 128, x1_shape, generator=generator, dtype=torch.int8)
        x2 = torch.randint(-128, 128, (case.n, k) if case.x2_transposed else (k, case.n),
                           generator=generator, dtype=torch.int8)
        scale32 = torch.rand(_scale_shape(case, k), generator=generator) * 1e-3 + 1e-4
        kwargs["dequant_scale"] = (pack_dequant_scale(scale32) if case.dtype == torch.float16
                                   else scale32.to(torch.bfloat16))
        if case.bias:
            kwargs["bias"] = torch.randint(-2000, 2000, (case.n,), generator=generator,
                                           dtype=torch.int32)
    else:
        x1 = _randn(generator, x1_shape, case.dtype)
        if case.mode == "plain":
            x2 = _randn(generator, (case.n, k) if case.x2_transposed else (k, case.n), case.dtype)
        else:
            x2 = torch.randint(-128, 128, (case.n, k) if case.x2_transposed else (k, case.n),
                               generator=generator, dtype=torch.int8)
            scale_shape = _scale_shape(case, k)
            kwargs["antiquant_scale"] = (torch.rand(scale_shape, generator=generator) * 0.02
                                         + 0.005).to(case.dtype)
            if case.offset:
                kwargs["antiquant_offset"] = torch.randint(
                    -4, 5, scale_shape, generator=generator).to(case.dtype)
            kwargs["antiquant_group_size"] = case.group_size
        if case.bias:
            kwargs["bias"] = _randn(generator, (case.n,), case.dtype)
    if case.x2_transposed:
        x2 = x2.t()
    if case.x3:
        kwargs["x3"] = _randn(generator, case.out_shape(), case.dtype)
    return x1, x2, kwargs


def dequant_scale_fp64(scale):
    """The fp32 scale the operator reads: the low 32 bits of a packed int64, or a bf16 value."""
    if scale.dtype == torch.int64:
        low = (scale & 0xFFFFFFFF).to(torch.int64)
        as_int32 = torch.where(low >= 2 ** 31, low - 2 ** 32, low).to(torch.int32)
        return as_int32.view(torch.float32).double()
    return scale.double()


def partial_fp64(case, x1, x2, kwargs):
    """(P_r, S_r): one rank's exact partial and the sum of its terms' magnitudes, in fp64."""
    a = x1.reshape(-1, x1.shape[-1]).double()
    w = x2.double()
    if case.mode == "weight_quant":
        def per_row(factor):  # a per-group [ceil(k/G), n] factor, one row per row of x2
            factor = factor.double()
            if case.group_size:
                factor = factor.repeat_interleave(case.group_size, dim=0)[: w.shape[0]]
            return factor

        offset = kwargs.get("antiquant_offset")
        if offset is not None:
            w = w + per_row(offset)
        w = w * per_row(kwargs["antiquant_scale"])
    partial = a @ w
    magnitude = a.abs() @ w.abs()
    bias = kwargs.get("bias")
    if bias is not None:
        partial = partial + bias.double()
        magnitude = magnitude + bias.double().abs()
    if case.mode == "full_quant":
        scale = dequant_scale_fp64(kwargs["dequant_scale"]).reshape(-1)
        partial = partial * scale
        magnitude = magnitude * scale.abs()
    x3 = kwargs.get("x3")
    if x3 is not None:
        partial = partial + x3.double().reshape(partial.shape)
        magnitude = magnitude + x3.double().abs().reshape(partial.shape)
    return partial.reshape(case.out_shape()), magnitude.reshape(case.out_shape())


def reference(case, world_size):
    """(the fp64 result, its elementwise error bound) for `world_size` ranks."""
    partials, magnitudes = zip(*(partial_fp64(case, *make_inputs(case, rank))
                                 for rank in range(world_size)))
    result = sum(partials)
    abs_partials = sum(p.abs() for p in partials)
    k_max = max(case.k_of(rank) for rank in range(world_size))
    return result, error_bound(case.dtype, abs_partials, sum(magnitudes), k_max,
                               world_size, bf16_weights=case.mode == "weight_quant"
                               and case.dtype == torch.bfloat16)


def error_bound(out_dtype, abs_partials, magnitudes, k, p, bf16_weights=False):
    """The module docstring's bound; abs_partials is A, magnitudes S (elementwise)."""
    u_out = UNIT_ROUNDOFF[out_dtype]
    fp32_terms = (k + 3 + p) * U32 * magnitudes
    if out_dtype == torch.bfloat16:
        fp32_terms = fp32_terms + (UNIT_ROUNDOFF[torch.bfloat16] * magnitudes if bf16_weights else 0) \
            + k * 2.0 ** -126
    return (SECOND_ORDER * (2 * u_out * (abs_partials + fp32_terms) + fp32_terms)
            + (p + 1) * HALF_SUBNORMAL_STEP[out_dtype])


def gradient_bound(dtype, reference, magnitudes, terms):
    """How far a gradient computed as an fp32 sum of `terms` products, rounded
    once to `dtype`, may be from torch's fp32 autograd of it (`reference`),
    elementwise; magnitudes is S, the sum of the terms' magnitudes. With E
    the exact value, g = terms * u32 and u the dtype's unit roundoff:
        |ours - E| <= u * (|E| + g * S) + g * S + eta,   |torch_fp32 - E| <= g * S,
    and |E| <= |torch_fp32| + g * S; second-order terms are within 1.01."""
    fp32 = 2 * terms * U32 * magnitudes
    return (SECOND_ORDER * (UNIT_ROUNDOFF[dtype] * (reference.abs() + fp32) + fp32)
            + HALF_SUBNORMAL_STEP[dtype])
