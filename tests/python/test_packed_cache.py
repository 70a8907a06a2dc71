"""The binding keeps a weight packed between calls while it is unchanged:
repeated calls with the same tensor reuse the packing (and give the same
bits), and a weight or scale changed in place is packed again, so the result
follows its new values."""
import torch

import tpfuse
from reference import Case, make_inputs, reference


def _check(outputs, case, world_size, what):
    expected, bound = reference(case, world_size)
    for rank, out in enumerate(outputs):
        assert torch.equal(out, outputs[0]), f"{what}: rank {rank}'s output differs from rank 0's"
    error = (outputs[0].double() - expected).abs()
    assert (error <= bound).all(), f"{what}: error {float(error.max()):.3g} beyond the bound"


def repeated_calls(rank, world_size, case):
    x1, x2, kwargs = make_inputs(case, rank)
    hcom = tpfuse.get_comm_name()
    before = tpfuse.packed_weight_cache_info()
    outs = [tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs) for _ in range(3)]
    after = tpfuse.packed_weight_cache_info()
    return outs, after["hits"] - before["hits"], after["misses"] - before["misses"]


def test_repeated_calls_reuse_the_packing(ranks):
    for case in (Case(mode="plain", dtype=torch.bfloat16, m=16, k=96, n=80, x2_transposed=True),
                 Case(mode="weight_quant", dtype=torch.bfloat16, m=70, k=64, n=48,
                      scale="per_channel", offset=True),
                 Case(mode="full_quant", dtype=torch.float16, m=9, k=64, n=40, bias=True)):
        results = ranks(2).run(repeated_calls, case)
        for rank, (outs, hits, misses) in enumerate(results):
            assert misses == 1 and hits == 2, f"{case}: rank {rank}: {misses} misses, {hits} hits"
            assert all(torch.equal(out, outs[0]) for out in outs), f"{case}: results changed"


def changed_in_place(rank, world_size, case, change):
    x1, x2, kwargs = make_inputs(case, rank)
    hcom = tpfuse.get_comm_name()
    first = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
    if change == "weight":
        with torch.no_grad():
            x2.neg_()  # a view's in-place change bumps the version its base shares
    else:
        with torch.no_grad():
            kwargs["antiquant_scale"].mul_(2)
    second = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
    return first, second


def test_a_weight_changed_in_place_is_packed_again(ranks):
    case = Case(mode="plain", dtype=torch.bfloat16, m=32, k=96, n=80, x2_transposed=True)
    results = ranks(2).run(changed_in_place, case, "weight")
    _check([first for first, _ in results], case, 2, "before the change")
    # -x2 gives -(x1 @ x2): the same numbers with their signs flipped, bit for bit.
    for rank, (first, second) in enumerate(results):
        assert torch.equal(second, -first), f"rank {rank}: the result did not follow the new weight"


def test_a_scale_changed_in_place_is_packed_again(ranks):
    case = Case(mode="weight_quant", dtype=torch.bfloat16, m=80, k=64, n=48, scale="per_channel")
    results = ranks(2).run(changed_in_place, case, "scale")
    for rank, (first, second) in enumerate(results):
        # Twice the scale: each dequantized weight, and so every sum, doubles exactly.
        assert torch.equal(second, first * 2), f"rank {rank}: the result did not follow the new scale"


def add_rms_norm_calls(rank, world_size, case):
    x1, x2, kwargs = make_inputs(case, rank)
    hcom = tpfuse.get_comm_name()
    n = x2.shape[1]
    generator = torch.Generator().manual_seed(7)
    residual = torch.randn(1, case.m, n, generator=generator).to(case.dtype)
    gamma = torch.randn(n, generator=generator).to(case.dtype)
    before = tpfuse.packed_weight_cache_info()
    outs = [tpfuse.npu_mm_all_reduce_add_rms_norm(x1, x2, residual, gamma, hcom, **kwargs)
            for _ in range(3)]
    after = tpfuse.packed_weight_cache_info()
    # The same weight through mm_all_reduce_base: the packing it already has.
    tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
    shared = tpfuse.packed_weight_cache_info()["hits"] - after["hits"]
    return outs, after["hits"] - before["hits"], after["misses"] - before["misses"], shared


def test_add_rms_norm_reuses_the_packing(ranks):
    for case in (Case(mode="plain", dtype=torch.bfloat16, m=4, k=96, n=80, x2_transposed=True),
                 Case(mode="weight_quant", dtype=torch.bfloat16, m=1, k=64, n=48,
                      scale="per_channel", x2_transposed=True)):
        results = ranks(2).run(add_rms_norm_calls, case)
        for rank, (outs, hits, misses, shared) in enumerate(results):
            assert misses == 1 and hits == 2, f"{case}: rank {rank}: {misses} misses, {hits} hits"
            assert shared == 1, f"{case}: rank {rank}: mm_all_reduce_base packed it again"
            for y, norm in outs:
                assert torch.equal(y, outs[0][0]) and torch.equal(norm, outs[0][1]), \
                    f"{case}: results changed"



def sequence_parallel_calls(rank, world_size, case):
    x1, x2, _ = make_inputs(case, rank)
    hcom = tpfuse.get_comm_name()
    before = tpfuse.packed_weight_cache_info()
    gathered = [tpfuse.npu_all_gather_base_mm(x1, x2, hcom, world_size)[0] for _ in range(2)]
    scattered = [tpfuse.npu_mm_reduce_scatter_base(x1, x2, hcom, world_size) for _ in range(2)]
    after = tpfuse.packed_weight_cache_info()
    return gathered, scattered, after["hits"] - before["hits"], after["misses"] - before["misses"]


def test_the_sequence_parallel_pair_reuses_the_packing(ranks):
    # Their bits against unpacked calls: packed_weight_test (C++).
    case = Case(mode="plain", dtype=torch.bfloat16, m=8, k=96, n=80, x2_transposed=True)
    results = ranks(2).run(sequence_parallel_calls, case)
    for rank, (gathered, scattered, hits, misses) in enumerate(results):
        assert misses == 1 and hits == 3, f"rank {rank}: {misses} misses, {hits} hits"
        assert torch.equal(gathered[0], gathered[1]), f"rank {rank}: all-gather results changed"
        assert torch.equal(scattered[0], scattered[1]), f"rank {rank}: reduce-scatter results changed"
