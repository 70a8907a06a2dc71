"""Autograd of the sequence-parallel operators (plain mode) against torch's
own fp32 autograd of the same computation on one process, the ranks
simulated: each rank's gradients must match the single process's gradients
of that rank's tensors. The quant paths and the add-RMSNorm operator refuse
a tensor that requires grad.

all_gather_base_mm: rank r's output is X @ x2_r + bias_r, X = concat over q of
x1_q, upstream gradient G_r ([p*m, n_r]):
  grad x1_r = rows r of sum over q of G_q @ x2_q^T, by mm_reduce_scatter_base:
    reference.error_bound (n terms, p partials) against the exact value, and
    torch's fp32 sum of p products of n terms errs by (n + p - 1) * u32 * S;
  grad x2_r = X^T @ G_r, grad bias_r = G_r's row sum: p*m terms in fp32,
    rounded once: reference.gradient_bound.
mm_reduce_scatter_base: rank r's output is rows r of sum over q of
(x1_q @ x2_q + bias_q), upstream gradient G_r ([m/p, n]), G = concat of G_r:
  grad x1_q = G @ x2_q^T, by all_gather_base_mm: n terms in fp32 rounded once,
    family_reference.single_rounding_bound, and torch's n * u32 * S;
  grad x2_q = x1_q^T @ G, grad bias_q = G's row sum: m terms, gradient_bound.
"""
import pytest
import torch

import tpfuse
from family_reference import BF16, F16, SPCase, make_sp_inputs, rows_of, single_rounding_bound
from reference import U32, error_bound, gradient_bound

WORLD_SIZES = [1, 2, 3]
ARGUMENTS = ("x1", "x2", "bias")

ALL_GATHER_CASES = [
    SPCase(dtype=F16, bias=True),
    SPCase(dtype=BF16, bias=True, x2_transposed=True, uneven=True, gather_output=False),
]
REDUCE_SCATTER_CASES = [
    SPCase(dtype=F16, bias=True),
    SPCase(dtype=BF16, bias=True, x2_transposed=True, uneven=True),
]


def upstream_gradient(case, rank, shape):
    generator = torch.Generator().manual_seed(7919 * case.seed + rank)
    return torch.randn(shape, generator=generator).to(case.dtype)


def out_shape(case, op, rank, world_size):
    if op == "all_gather":
        return (world_size * case.m, case.n_of(rank, op))
    return (case.m // world_size, case.n)


def leaves(case, op, rank, needs_grad, dtype=None):
    """Rank `rank`'s x1, x2 (as the operator takes it) and bias as leaf
    tensors (of `dtype` when given), those in needs_grad requiring grad, and
    the other keyword arguments. A transposed x2 is a view of its [n, k] leaf."""
    x1, x2, kwargs = make_sp_inputs(case, rank, op)
    values = {"x1": x1, "x2": x2.t() if case.x2_transposed else x2, "bias": kwargs.pop("bias")}
    tensors = {name: value.to(dtype or value.dtype).detach().clone().requires_grad_(
        name in needs_grad) for name, value in values.items()}
    used_x2 = tensors["x2"].t() if case.x2_transposed else tensors["x2"]
    return tensors, used_x2, kwargs


def grads_of(tensors, case):
    grads = {name: tensor.grad for name, tensor in tensors.items()}
    if case.x2_transposed and grads["x2"] is not None:
        grads["x2"] = grads["x2"].t()
    return grads


def forward_backward(rank, world_size, op, case, needs_grad):
    tensors, x2, kwargs = leaves(case, op, rank, needs_grad)
    hcom = tpfuse.get_comm_name()
    if op == "all_gather":
        out, gather_out = tpfuse.npu_all_gather_base_mm(tensors["x1"], x2, hcom, world_size,
                                                        bias=tensors["bias"], **kwargs)
        assert not gather_out.requires_grad
    else:
        out = tpfuse.npu_mm_reduce_scatter_base(tensors["x1"], x2, hcom, world_size,
                                                bias=tensors["bias"], **kwargs)
    assert out.requires_grad
    out.backward(upstream_gradient(case, rank, out_shape(case, op, rank, world_size)))
    return grads_of(tensors, case)


def torch_fp32_gradients(case, op, world_size):
    """Every rank's gradients by torch's autograd of the whole computation, in fp32."""
    per_rank = [leaves(case, op, rank, ARGUMENTS, torch.float32) for rank in range(world_size)]
    grads = [upstream_gradient(case, r, out_shape(case, op, r, world_size)).float()
             for r in range(world_size)]
    if op == "all_gather":
        gathered = torch.cat([tensors["x1"] for tensors, _, _ in per_rank])
        loss = sum(((gathered @ x2 + tensors["bias"]) * grad).sum()
                   for (tensors, x2, _), grad in zip(per_rank, grads))
    else:
        full = sum(tensors["x1"] @ x2 + tensors["bias"] for tensors, x2, _ in per_rank)
        loss = (full * torch.cat(grads)).sum()
    loss.backward()
    return [grads_of(tensors, case) for tensors, _, _ in per_rank]


def bounds(case, op, world_size, rank, fp32_reference):
    """{name: the elementwise bound} for rank `rank`'s gradients (module
    docstring); fp32_reference is torch's fp32 gradients of that rank."""
    inputs = [make_sp_inputs(case, q, op) for q in range(world_size)]
    x1s = [x1.double() for x1, _, _ in inputs]
    x2s = [x2.double() for _, x2, _ in inputs]
    grads = [upstream_gradient(case, q, out_shape(case, op, q, world_size)).double()
             for q in range(world_size)]
    if op == "all_gather":
        partials = [rows_of(g @ x2.t(), rank, world_size) for g, x2 in zip(grads, x2s)]
        magnitudes = sum(rows_of(g.abs() @ x2.abs().t(), rank, world_size)
                         for g, x2 in zip(grads, x2s))
        n_max = max(case.n_of(q, op) for q in range(world_size))
        x1 = (error_bound(case.dtype, sum(p.abs() for p in partials), magnitudes, n_max,
                          world_size) + (n_max + world_size - 1) * U32 * magnitudes)
        rows = torch.cat(x1s)
        grad = grads[rank]
    else:
        gathered = torch.cat(grads)
        x2 = x2s[rank]
        exact, magnitudes = gathered @ x2.t(), gathered.abs() @ x2.abs().t()
        x1 = (single_rounding_bound(case.dtype, exact.abs(), magnitudes, case.n, 0)
              + case.n * U32 * magnitudes)
        rows, grad = x1s[rank], gathered
    terms = rows.shape[0]
    return {
        "x1": x1,
        "x2": gradient_bound(case.dtype, fp32_reference["x2"].double(),
                             rows.abs().t() @ grad.abs(), terms),
        "bias": gradient_bound(case.dtype, fp32_reference["bias"].double(),
                               grad.abs().sum(0), terms),
    }


def check_gradients(case, op, world_size, grads, needs_grad):
    expected = torch_fp32_gradients(case, op, world_size)
    for rank in range(world_size):
        bound = bounds(case, op, world_size, rank, expected[rank])
        for name in ARGUMENTS:
            ours = grads[rank][name]
            if name not in needs_grad:
                assert ours is None, f"rank {rank}: {name} got a gradient it did not ask for"
                continue
            reference = expected[rank][name]
            assert ours.dtype == case.dtype and ours.shape == reference.shape, name
            error = (ours.double() - reference.double()).abs()
            assert (error <= bound[name]).all(), (
                f"rank {rank}: grad {name} error {error.max():.3g} exceeds its bound "
                f"(ratio {(error / bound[name]).max():.3g})")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("op, case", [("all_gather", case) for case in ALL_GATHER_CASES]
                         + [("reduce_scatter", case) for case in REDUCE_SCATTER_CASES],
                         ids=lambda value: str(value))
def test_gradients_match_torch_fp32(ranks, world_size, op, case):
    grads = ranks(world_size).run(forward_backward, op, case, ARGUMENTS)
    check_gradients(case, op, world_size, grads, ARGUMENTS)


@pytest.mark.parametrize("op, case, needs_grad", [
    ("all_gather", ALL_GATHER_CASES[1], ("x2",)),     # gathers x1 again, no reduce-scatter
    ("reduce_scatter", REDUCE_SCATTER_CASES[1], ("bias",)),  # gathers the gradient alone
], ids=lambda value: str(value))
def test_only_requested_gradients(ranks, op, case, needs_grad):
    grads = ranks(3).run(forward_backward, op, case, needs_grad)
    check_gradients(case, op, 3, grads, needs_grad)


# ---- no backward ----
#
# The refusal comes before any communication, so these run in the test
# process, with an hcom that names no communicator: under torch.no_grad() the
# same calls get as far as looking it up.

NO_GROUP = "no-such-group"


def quant_inputs(rank=0):
    return make_sp_inputs(SPCase(quant=True, dtype=BF16, x1_scale=True), rank, "reduce_scatter")


def all_gather_quant(name):
    x1, x2, kwargs = quant_inputs()
    kwargs[name].requires_grad_()
    return lambda: tpfuse.npu_all_gather_base_mm(x1, x2, NO_GROUP, 1, **kwargs)


def reduce_scatter_quant(name):
    x1, x2, kwargs = quant_inputs()
    kwargs[name].requires_grad_()
    return lambda: tpfuse.npu_mm_reduce_scatter_base(x1, x2, NO_GROUP, 1, **kwargs)


def add_rms_norm(name, in_place):
    arguments = {"x1": torch.ones(4, 8, dtype=F16), "x2": torch.ones(8, 6, dtype=F16),
                 "residual": torch.ones(1, 4, 6, dtype=F16), "gamma": torch.ones(6, dtype=F16)}
    arguments[name].requires_grad_()
    call = (tpfuse.npu_mm_all_reduce_add_rms_norm_ if in_place
            else tpfuse.npu_mm_all_reduce_add_rms_norm)
    return lambda: call(*arguments.values(), NO_GROUP)


REFUSALS = {
    "all_gather_base_mm quant x2_scale": (
        lambda: all_gather_quant("x2_scale"),
        "all_gather_base_mm: the quant path (x1 and x2 int8) has no backward, and x2_scale "
        "requires grad (detach it, or call the operator under torch.no_grad())"),
    "mm_reduce_scatter_base quant x1_scale": (
        lambda: reduce_scatter_quant("x1_scale"),
        "mm_reduce_scatter_base: the quant path (x1 and x2 int8) has no backward, and x1_scale "
        "requires grad"),
    "mm_all_reduce_add_rms_norm residual": (
        lambda: add_rms_norm("residual", in_place=False),
        "mm_all_reduce_add_rms_norm: the operator has no backward, and residual requires grad"),
    "mm_all_reduce_add_rms_norm_ gamma": (
        lambda: add_rms_norm("gamma", in_place=True),
        "mm_all_reduce_add_rms_norm_: the operator has no backward, and gamma requires grad"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_no_backward_refuses_gradients(name):
    build, message = REFUSALS[name]
    with pytest.raises(RuntimeError) as error:
        build()()
    assert str(error.value).startswith(message), str(error.value)
    with torch.no_grad(), pytest.raises(ValueError, match=f'no communicator named "{NO_GROUP}"'):
        build()()
