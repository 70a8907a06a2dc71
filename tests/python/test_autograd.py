"""Plain mode's autograd against torch's own autograd of the same computation,
out = sum over ranks r of (x1_r @ x2_r + bias_r + x3_r), done in fp32 on one
process; the quantized modes refuse to differentiate, with a clear error.

Each rank's gradient is an fp32 product rounded once to the input dtype:
grad_x1 = G @ x2^T (a sum of n terms), grad_x2 = x1^T @ G (m terms),
grad_bias = the row sum of G (m terms), grad_x3 = G (exact). With E the
exact value, S the sum of the magnitudes of its terms, L the number of terms,
g = L * u32 (u32 = 2^-24) and u the dtype's unit roundoff (2^-11 f16, 2^-8 bf16):
    |ours - E| <= u * (|E| + g * S) + g * S + eta     (fp32 sum, then one rounding)
    |torch_fp32 - E| <= g * S
so, since |E| <= |torch_fp32| + g * S,
    |ours - torch_fp32| <= u * (|torch_fp32| + 2 g S) + 2 g S + eta,
where eta is half the dtype's smallest subnormal step; terms of second order
are covered by the factor 1.01, as in reference.py.
"""
import pytest
import torch

import tpfuse
from reference import Case, gradient_bound, make_inputs

F16, BF16 = torch.float16, torch.bfloat16
ARGUMENTS = ("x1", "x2", "bias", "x3")

CASES = [
    Case(mode="plain", dtype=F16, bias=True, x3=True),
    Case(mode="plain", dtype=BF16, batch=4, bias=True, x3=True, x2_transposed=True,
         uneven_k=True),
]


def upstream_gradient(case):
    generator = torch.Generator().manual_seed(7919 * case.seed)
    return torch.randn(case.out_shape(), generator=generator).to(case.dtype)


def leaves(case, rank, needs_grad, dtype=None):
    """Rank `rank`'s x1, x2 (as the operator takes it), bias and x3, as leaf
    tensors (of `dtype` when given), those named in needs_grad requiring grad.
    A transposed x2 is a view of its [n, k] leaf, as a stored weight would be."""
    x1, x2, kwargs = make_inputs(case, rank)
    values = {"x1": x1, "x2": x2.t() if case.x2_transposed else x2,
              "bias": kwargs.get("bias"), "x3": kwargs.get("x3")}
    tensors = {}
    for name, value in values.items():
        if value is not None:
            leaf = value.to(dtype or value.dtype).detach().clone()
            tensors[name] = leaf.requires_grad_(name in needs_grad)
    used_x2 = tensors["x2"].t() if case.x2_transposed else tensors["x2"]
    return tensors, used_x2


def grads_of(tensors, transposed_x2):
    grads = {name: tensor.grad for name, tensor in tensors.items()}
    if transposed_x2 and grads["x2"] is not None:
        grads["x2"] = grads["x2"].t()
    return grads


def forward_backward(rank, world_size, case, needs_grad):
    tensors, x2 = leaves(case, rank, needs_grad)
    out = tpfuse.npu_mm_all_reduce_base(tensors["x1"], x2, tpfuse.get_comm_name(),
                                        bias=tensors.get("bias"), x3=tensors.get("x3"))
    out.backward(upstream_gradient(case))
    return grads_of(tensors, case.x2_transposed)


def torch_fp32_gradients(case, world_size):
    """Each rank's gradients by torch's autograd of the whole sum, in fp32."""
    out = 0
    per_rank = []
    for rank in range(world_size):
        tensors, x2 = leaves(case, rank, ARGUMENTS, torch.float32)
        x1 = tensors["x1"]
        part = (x1.reshape(-1, x1.shape[-1]) @ x2).reshape(case.out_shape())
        for name in ("bias", "x3"):
            if name in tensors:
                part = part + tensors[name]
        out = out + part
        per_rank.append(tensors)
    out.backward(upstream_gradient(case).float())
    return [grads_of(tensors, case.x2_transposed) for tensors in per_rank]


def magnitudes_and_terms(case, rank, name):
    """(S, L) of the module docstring for rank `rank`'s gradient of `name`."""
    g = upstream_gradient(case).double().abs().reshape(-1, case.n)
    x1, x2, _ = make_inputs(case, rank)
    if name == "x1":
        return (g @ x2.double().abs().t()).reshape(x1.shape), case.n
    if name == "x2":
        return x1.double().abs().reshape(-1, x1.shape[-1]).t() @ g, case.m
    return g.sum(0), case.m


def check_gradients(case, world_size, grads, needs_grad):
    expected = torch_fp32_gradients(case, world_size)
    for rank in range(world_size):
        for name in ARGUMENTS:
            ours = grads[rank].get(name)
            if name not in needs_grad:
                assert ours is None, f"rank {rank}: {name} got a gradient it did not ask for"
                continue
            reference = expected[rank][name]
            assert ours.dtype == case.dtype and ours.shape == reference.shape, f"{name}"
            if name == "x3":
                assert torch.equal(ours.float(), reference), f"rank {rank}: grad x3 != G"
                continue
            magnitudes, terms = magnitudes_and_terms(case, rank, name)
            error = (ours.double() - reference.double()).abs()
            bound = gradient_bound(case.dtype, reference.double(), magnitudes, terms)
            assert (error <= bound).all(), (
                f"rank {rank}: grad {name} error {error.max():.3g} exceeds its bound "
                f"(ratio {(error / bound).max():.3g})")


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_torch_fp32(ranks, world_size, case):
    grads = ranks(world_size).run(forward_backward, case, ARGUMENTS)
    check_gradients(case, world_size, grads, ARGUMENTS)


def test_only_requested_gradients(ranks):
    case = CASES[1]
    grads = ranks(2).run(forward_backward, case, ("x2",))
    check_gradients(case, 2, grads, ("x2",))


def quantized_backward_error(rank, world_size, mode):
    case = Case(mode=mode, dtype=F16, x3=True)
    x1, x2, kwargs = make_inputs(case, rank)
    if mode == "weight_quant":
        x1.requires_grad_()
    kwargs["x3"].requires_grad_()
    out = tpfuse.npu_mm_all_reduce_base(x1, x2, tpfuse.get_comm_name(), **kwargs)
    try:
        out.sum().backward()
    except RuntimeError as error:
        return str(error)
    return None


@pytest.mark.parametrize("mode", ["weight_quant", "full_quant"])
def test_quantized_modes_refuse_gradients(ranks, mode):
    for message in ranks(2).run(quantized_backward_error, mode):
        assert message is not None and message.startswith(
            "mm_all_reduce_base: gradients are supported only in plain mode (x1 and x2 both f16 "
            f"or both bf16); this call ran in {mode} mode"), message


def output_requires_grad(rank, world_size):
    x1, x2, _ = make_inputs(Case(), rank)
    hcom = tpfuse.get_comm_name()
    plain = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom)
    with torch.no_grad():
        no_grad = tpfuse.npu_mm_all_reduce_base(x1.requires_grad_(), x2, hcom)
    tracked = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom)
    return plain.requires_grad, no_grad.requires_grad, tracked.requires_grad


def test_output_tracks_gradients_only_when_asked(ranks):
    assert ranks(2).run(output_requires_grad) == [(False, False, True)] * 2
