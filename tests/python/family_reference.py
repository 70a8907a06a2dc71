"""The sequence-parallel operators' test cases, their inputs, the fp64
reference and the error bound it must meet.

An SPCase describes one call of npu_all_gather_base_mm or
npu_mm_reduce_scatter_base; make_sp_inputs(case, rank) gives rank `rank`'s
(x1, x2, keyword arguments), the same in the rank and in the test process.

The bounds follow from how the contract computes (reference.py has the
notation: u32 = 2^-24, u_out and eta_out the output dtype's unit roundoff and
half its smallest subnormal step, S the sum of the magnitudes of the terms):

  all_gather_base_mm: each output element is one rank's product, accumulated
  in fp32 over k products plus the bias (on the quant path: summed exactly in
  int32, then at most three fp32 roundings: the int32 to fp32, the product of
  the scales and the scaling), so |a - P| <= (k + 3) * u32 * S = F, then
  rounded once to the output dtype:
      |out - P| <= u_out * (|P| + F) + F + eta_out,
  with second-order terms within the factor 1.01; with a bf16 output the
  engine may be AVX512-BF16's dot product, whose subnormal fp32 sums flush to
  zero (k * 2^-126 more in F).

  mm_reduce_scatter_base: rank r's rows are mm_all_reduce_base's, so the
  bound is reference.error_bound's, with the scaled product as the partial.
"""
import dataclasses

import torch

from reference import (HALF_SUBNORMAL_STEP, SECOND_ORDER, U32, UNIT_ROUNDOFF,
                       dequant_scale_fp64, error_bound, pack_dequant_scale)

F16, BF16 = torch.float16, torch.bfloat16


@dataclasses.dataclass(frozen=True)
class SPCase:
    quant: bool = False             # x1 and x2 int8
    dtype: torch.dtype = F16        # x1's dtype (plain) or the output's (quant)
    m: int = 12                     # rows of each rank's x1 (reduce-scatter: a multiple of p)
    k: int = 64
    n: int = 40
    uneven: bool = False            # rank r's n is n + 8r (all-gather), its k is k + 16r (reduce-scatter)
    bias: bool = False
    x1_scale: bool = False          # quant: a per-token [m, 1] scale
    x2_scale: str = "f32"           # quant: f32 [n] | f32_2d [1, n] | i64 [n] (packed)
    x2_transposed: bool = False     # x2 is the transpose of a row-major [n, k]
    gather_output: bool = True      # all-gather only
    comm_turn: int = 0
    comm_mode: str = None           # None | "ai_cpu" | "aiv": no effect on the result
    seed: int = 1

    def k_of(self, rank, op):
        return self.k + (16 * rank if self.uneven and op == "reduce_scatter" else 0)

    def n_of(self, rank, op):
        return self.n + (8 * rank if self.uneven and op == "all_gather" else 0)

    def __str__(self):
        fields = ["quant" if self.quant else "plain", str(self.dtype).replace("torch.", "")]
        if self.quant:
            fields.append(f"x2_scale={self.x2_scale}")
        fields += [flag for flag in ("bias", "x1_scale", "x2_transposed", "uneven")
                   if getattr(self, flag)]
        if not self.gather_output:
            fields.append("no_gather_out")
        if self.comm_mode:
            fields.append(f"comm_mode={self.comm_mode}")
        if self.comm_turn:
            fields.append(f"comm_turn={self.comm_turn}")
        return "-".join(fields)


def make_sp_inputs(case, rank, op):
    """(x1, x2, keyword arguments) of rank `rank` for `op` ("all_gather" or
    "reduce_scatter"), deterministic in (case, rank, op)."""
    generator = torch.Generator().manual_seed(2003 * case.seed + rank)
    k, n = case.k_of(rank, op), case.n_of(rank, op)
    shape2 = (n, k) if case.x2_transposed else (k, n)
    kwargs = {"comm_turn": case.comm_turn, "comm_mode": case.comm_mode}
    if op == "all_gather":
        kwargs["gather_output"] = case.gather_output
    if case.quant:
        x1 = torch.randint(-128, 128, (case.m, k), generator=generator, dtype=torch.int8)
        x2 = torch.randint(-128, 128, shape2, generator=generator, dtype=torch.int8)
        # bf16 values: the scale mm_all_reduce_base reads from a bf16 or packed dequant_scale.
        scale = (torch.rand(n, generator=generator) * 1e-3 + 1e-4).to(BF16).float()
        if case.x2_scale == "i64":
            kwargs["x2_scale"] = pack_dequant_scale(scale)
        else:
            kwargs["x2_scale"] = scale.reshape(1, n) if case.x2_scale == "f32_2d" else scale
            if case.dtype == F16:
                kwargs["output_dtype"] = F16
        if case.x1_scale:
            kwargs["x1_scale"] = torch.rand(case.m, 1, generator=generator) * 0.5 + 0.5
        if case.bias:
            kwargs["bias"] = torch.randint(-2000, 2000, (n,), generator=generator,
                                           dtype=torch.int32)
    else:
        x1 = torch.randn(case.m, k, generator=generator).to(case.dtype)
        x2 = torch.randn(shape2, generator=generator).to(case.dtype)
        if case.bias:
            kwargs["bias"] = torch.randn(n, generator=generator).to(case.dtype)
    return x1, x2.t() if case.x2_transposed else x2, kwargs


def mm_all_reduce_base_kwargs(case, kwargs):
    """mm_all_reduce_base's arguments for the same product (no x1_scale):
    the x2_scale as a dequant_scale, packed for an f16 output."""
    same = {"bias": kwargs.get("bias"), "comm_turn": case.comm_turn}
    if case.quant:
        scale = kwargs["x2_scale"]
        if scale.dtype != torch.int64:
            scale = pack_dequant_scale(scale) if case.dtype == F16 else scale.to(BF16)
        same["dequant_scale"] = scale
    return same


def product_fp64(case, x1, x2, kwargs, x1_scale=None):
    """(P, S): the exact x1 @ x2 + bias (scaled on the quant path) and the
    sum of its terms' magnitudes, in fp64."""
    a, w = x1.double(), x2.double()
    product, magnitude = a @ w, a.abs() @ w.abs()
    bias = kwargs.get("bias")
    if bias is not None:
        product, magnitude = product + bias.double(), magnitude + bias.double().abs()
    if case.quant:
        scale = dequant_scale_fp64(kwargs["x2_scale"]).reshape(1, -1)
        if x1_scale is not None:
            scale = x1_scale.double().reshape(-1, 1) * scale
        product, magnitude = product * scale, magnitude * scale.abs()
    return product, magnitude


def single_rounding_bound(out_dtype, abs_exact, magnitudes, k, extra_roundings=3):
    """The module docstring's all_gather_base_mm bound, elementwise; a product
    without bias or scales (a gradient) has no extra roundings."""
    fp32_terms = (k + extra_roundings) * U32 * magnitudes
    if out_dtype == BF16:
        fp32_terms = fp32_terms + k * 2.0 ** -126
    return (SECOND_ORDER * (UNIT_ROUNDOFF[out_dtype] * (abs_exact + fp32_terms) + fp32_terms)
            + HALF_SUBNORMAL_STEP[out_dtype])


def all_gather_reference(case, world_size, rank):
    """(gather_out, rank `rank`'s fp64 output, its bound)."""
    inputs = [make_sp_inputs(case, q, "all_gather") for q in range(world_size)]
    gathered = torch.cat([x1 for x1, _, _ in inputs])
    x1_scale = (torch.cat([kwargs["x1_scale"] for _, _, kwargs in inputs]) if case.x1_scale
                else None)
    _, x2, kwargs = inputs[rank]
    product, magnitude = product_fp64(case, gathered, x2, kwargs, x1_scale)
    return gathered, product, single_rounding_bound(case.dtype, product.abs(), magnitude, case.k)


def reduce_scatter_reference(case, world_size):
    """(the fp64 sum over ranks, [m, n], and its bound); rank r's output is rows r of it."""
    partials, magnitudes = zip(*(
        product_fp64(case, x1, x2, kwargs, kwargs.get("x1_scale"))
        for x1, x2, kwargs in (make_sp_inputs(case, rank, "reduce_scatter")
                               for rank in range(world_size))))
    k_max = max(case.k_of(rank, "reduce_scatter") for rank in range(world_size))
    return sum(partials), error_bound(case.dtype, sum(p.abs() for p in partials),
                                      sum(magnitudes), k_max, world_size)


def rows_of(tensor, rank, world_size):
    rows = tensor.shape[0] // world_size
    return tensor[rank * rows:(rank + 1) * rows]


# ---- mm_all_reduce_add_rms_norm ----
#
# y = round(fl32(mm_out) + fl32(residual)) with mm_out within B (reference.py's
# bound) of the exact product sum M, so, to first order,
#     |y - (M + R)| <= (u_out + u32) * (|M + R| + B) + B + eta_out.
# norm_out is checked against the fp64 norm of the y the operator returned,
# y * rstd * gamma with rstd = 1 / sqrt(mean(y^2) + epsilon). The squares are
# exact in fp32 (a square of an 11- or 8-bit significand), their sum of n
# non-negative terms errs by at most (n - 1) * u32 relatively, the division
# by n, epsilon's conversion to fp32 and the addition by u32 each: (n + 2) * u32
# in all; sqrt halves that and adds u32, the reciprocal adds u32, so rstd errs
# by rho = ((n + 2) / 2 + 2) * u32. t = round(fl32(y * rstd)) then errs by
# |y rstd| (rho + u32 + u_out) + eta_out and norm_out = round(fl32(t * gamma)) by
#     |y rstd gamma| (rho + 2 u32 + 2 u_out) + (|gamma| + 1) eta_out.
# Second-order terms are within the factor 1.01.


def norm_inputs(case):
    """(residual [b, s, n], gamma [n]) of the output's dtype, the same on every rank."""
    generator = torch.Generator().manual_seed(4001 * case.seed)
    b = case.batch or 2
    residual = torch.randn(b, case.m // b, case.n, generator=generator).to(case.dtype)
    gamma = (torch.rand(case.n, generator=generator) + 0.5).to(case.dtype)
    return residual, gamma


def y_bound(out_dtype, exact, mm_bound):
    """The bound on y above; exact is M + R in fp64."""
    return (SECOND_ORDER * ((UNIT_ROUNDOFF[out_dtype] + U32) * (exact.abs() + mm_bound) + mm_bound)
            + HALF_SUBNORMAL_STEP[out_dtype])


def rms_norm_reference(y, gamma, epsilon):
    """(the fp64 norm of y, its bound) as derived above."""
    y64, gamma64 = y.double(), gamma.double()
    n = y.shape[-1]
    rstd = 1 / torch.sqrt((y64 * y64).mean(-1, keepdim=True) + epsilon)
    golden = y64 * rstd * gamma64
    rho = ((n + 2) / 2 + 2) * U32
    u_out, eta = UNIT_ROUNDOFF[y.dtype], HALF_SUBNORMAL_STEP[y.dtype]
    return golden, SECOND_ORDER * (golden.abs() * (rho + 2 * U32 + 2 * u_out)
                                   + (gamma64.abs() + 1) * eta)
