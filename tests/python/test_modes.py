"""Every mode, 2-D and 3-D, with bias and x3, on 1, 2 and 4 ranks, against the
fp64 reference within the bound derived in reference.py; every rank must get
bitwise the same output."""
import pytest
import torch

import tpfuse
from reference import Case, make_inputs, reference

F16, BF16 = torch.float16, torch.bfloat16

CASES = [
    Case(mode="plain", dtype=F16),
    Case(mode="plain", dtype=BF16, batch=4, bias=True, x3=True),
    Case(mode="plain", dtype=F16, batch=3, bias=True, x3=True, x2_transposed=True, uneven_k=True),
    Case(mode="plain", dtype=BF16, m=37, comm_turn=3, bias=True),
    Case(mode="weight_quant", dtype=F16, scale="per_tensor"),
    Case(mode="weight_quant", dtype=BF16, scale="per_channel", offset=True, batch=2, bias=True),
    Case(mode="weight_quant", dtype=F16, scale="per_channel_2d", x3=True, uneven_k=True),
    Case(mode="weight_quant", dtype=BF16, scale="per_group", group_size=32, k=80, offset=True,
         x3=True),
    Case(mode="weight_quant", dtype=F16, scale="per_group", group_size=64, k=128, batch=4,
         offset=True, bias=True, x3=True, x2_transposed=True),
    Case(mode="full_quant", dtype=F16, scale="per_tensor"),
    Case(mode="full_quant", dtype=F16, scale="per_channel", batch=2, bias=True, x3=True),
    Case(mode="full_quant", dtype=BF16, scale="per_channel_2d", bias=True, x2_transposed=True,
         uneven_k=True),
    Case(mode="full_quant", dtype=BF16, scale="per_tensor", batch=6, x3=True, comm_turn=2),
]


def run_case(rank, world_size, case):
    x1, x2, kwargs = make_inputs(case, rank)
    return tpfuse.npu_mm_all_reduce_base(x1, x2, tpfuse.get_comm_name(), reduce_op="sum",
                                         **kwargs)


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_fp64_reference(ranks, world_size, case):
    outputs = ranks(world_size).run(run_case, case)

    expected, bound = reference(case, world_size)
    for rank, out in enumerate(outputs):
        assert out.dtype == case.dtype and tuple(out.shape) == case.out_shape(), f"rank {rank}"
        assert torch.equal(out, outputs[0]), f"rank {rank}'s output differs from rank 0's"
    error = (outputs[0].double() - expected).abs()
    worst = int((error - bound).argmax())
    assert (error <= bound).all(), (
        f"error {error.flatten()[worst]:.3g} exceeds its bound {bound.flatten()[worst]:.3g} "
        f"at flat index {worst} (max error {error.max():.3g})")


def run_op_and_alias(rank, world_size, case):
    x1, x2, kwargs = make_inputs(case, rank)
    hcom = tpfuse.get_comm_name()
    return (tpfuse.mm_all_reduce_base(x1, x2, hcom, **kwargs),
            torch.ops.tpfuse.mm_all_reduce_base(x1, x2, hcom, **kwargs),
            tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs))


def test_alias_and_torch_op_agree(ranks):
    case = Case(mode="plain", dtype=BF16, bias=True)
    for alias, op, npu_name in ranks(2).run(run_op_and_alias, case):
        assert torch.equal(alias, npu_name) and torch.equal(op, npu_name)
