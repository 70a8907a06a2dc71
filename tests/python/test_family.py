"""The rest of the family on 1, 2 and 3 ranks, against the fp64 references
within the bounds derived in family_reference.py and reference.py:

- npu_all_gather_base_mm and npu_mm_reduce_scatter_base, plain (f16, bf16)
  and quant: gather_out is every rank's x1 in rank order, bitwise the same on
  every rank; the reduce-scatter's output is bitwise the matching rows of
  npu_mm_all_reduce_base's;
- npu_mm_all_reduce_add_rms_norm(_), every mode: y is bitwise
  round(npu_mm_all_reduce_base's output + residual), the in-place form
  returns residual itself, holding y;
- every operator takes slices, expanded tensors and strided weights, giving
  the bits of contiguous copies;
- one validation error per operator reaches Python with its message.
"""
import pytest
import torch

import tpfuse
from family_reference import (BF16, F16, SPCase, all_gather_reference, make_sp_inputs,
                              mm_all_reduce_base_kwargs, norm_inputs, reduce_scatter_reference,
                              rms_norm_reference, rows_of, y_bound)
from reference import Case, make_inputs, reference

WORLD_SIZES = [1, 2, 3]

ALL_GATHER_CASES = [
    SPCase(dtype=F16),
    SPCase(dtype=BF16, bias=True, x2_transposed=True, uneven=True, comm_turn=2),
    SPCase(dtype=F16, bias=True, gather_output=False, comm_mode="ai_cpu"),
    SPCase(quant=True, dtype=F16, x2_scale="i64", bias=True, x1_scale=True),
    SPCase(quant=True, dtype=BF16, x2_scale="f32_2d", x1_scale=True, x2_transposed=True),
    SPCase(quant=True, dtype=F16, x2_scale="f32", bias=True, uneven=True),
]

REDUCE_SCATTER_CASES = [
    SPCase(dtype=F16),
    SPCase(dtype=BF16, bias=True, x2_transposed=True, uneven=True, comm_turn=3),
    SPCase(quant=True, dtype=F16, x2_scale="i64", bias=True, comm_mode="aiv"),
    SPCase(quant=True, dtype=BF16, x2_scale="f32", x1_scale=True, uneven=True),
    SPCase(quant=True, dtype=F16, x2_scale="f32_2d", bias=True, x2_transposed=True),
]


def check_within(out, expected, bound, what):
    error = (out.double() - expected).abs()
    worst = int((error - bound).argmax())
    assert (error <= bound).all(), (
        f"{what}: error {error.flatten()[worst]:.3g} exceeds its bound "
        f"{bound.flatten()[worst]:.3g} at flat index {worst} (max error {error.max():.3g})")


def run_all_gather(rank, world_size, case):
    x1, x2, kwargs = make_sp_inputs(case, rank, "all_gather")
    return tpfuse.npu_all_gather_base_mm(x1, x2, tpfuse.get_comm_name(), world_size, **kwargs)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", ALL_GATHER_CASES, ids=str)
def test_all_gather_base_mm(ranks, world_size, case):
    results = ranks(world_size).run(run_all_gather, case)
    for rank, (output, gather_out) in enumerate(results):
        gathered, expected, bound = all_gather_reference(case, world_size, rank)
        if case.gather_output:
            assert torch.equal(gather_out, gathered), f"rank {rank}: gather_out is not concat(x1)"
        else:
            assert gather_out.shape == (0,) and gather_out.dtype == gathered.dtype, \
                f"rank {rank}: gather_out {gather_out.shape} {gather_out.dtype}"
        assert output.dtype == case.dtype and output.shape == expected.shape, f"rank {rank}"
        check_within(output, expected, bound, f"rank {rank}")


def run_reduce_scatter(rank, world_size, case):
    x1, x2, kwargs = make_sp_inputs(case, rank, "reduce_scatter")
    hcom = tpfuse.get_comm_name()
    out = tpfuse.npu_mm_reduce_scatter_base(x1, x2, hcom, world_size, reduce_op="sum", **kwargs)
    if case.x1_scale:
        return out, None
    return out, tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **mm_all_reduce_base_kwargs(case,
                                                                                        kwargs))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case", REDUCE_SCATTER_CASES, ids=str)
def test_mm_reduce_scatter_base(ranks, world_size, case):
    results = ranks(world_size).run(run_reduce_scatter, case)
    expected, bound = reduce_scatter_reference(case, world_size)
    for rank, (out, all_reduced) in enumerate(results):
        assert out.dtype == case.dtype and out.shape == (case.m // world_size, case.n), \
            f"rank {rank}: {out.shape} {out.dtype}"
        if all_reduced is not None:
            assert torch.equal(out, rows_of(all_reduced, rank, world_size)), \
                f"rank {rank}: not the rows of npu_mm_all_reduce_base's output"
        check_within(out, rows_of(expected, rank, world_size), rows_of(bound, rank, world_size),
                     f"rank {rank}")


NORM_CASES = [
    (Case(mode="plain", dtype=F16), 1e-6),
    (Case(mode="plain", dtype=BF16, batch=4, bias=True, x2_transposed=True, uneven_k=True), 1e-6),
    (Case(mode="weight_quant", dtype=F16, scale="per_group", group_size=32, offset=True,
          bias=True, comm_turn=2), 0.25),
    (Case(mode="weight_quant", dtype=BF16, scale="per_channel", batch=2), 1e-6),
    (Case(mode="full_quant", dtype=F16, scale="per_channel", bias=True), 1e-6),
    (Case(mode="full_quant", dtype=BF16, scale="per_tensor", batch=3, x2_transposed=True), 1e-3),
]


def run_add_rms_norm(rank, world_size, case, epsilon):
    x1, x2, kwargs = make_inputs(case, rank)
    residual, gamma = norm_inputs(case)
    hcom = tpfuse.get_comm_name()
    y, norm_out = tpfuse.npu_mm_all_reduce_add_rms_norm(x1, x2, residual, gamma, hcom,
                                                        reduce_op="sum", epsilon=epsilon, **kwargs)
    mm_out = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **kwargs)
    in_place = residual.clone()
    version = in_place._version
    returned, norm_in_place = tpfuse.npu_mm_all_reduce_add_rms_norm_(
        x1, x2, in_place, gamma, hcom, epsilon=epsilon, **kwargs)
    changed = returned is in_place and in_place._version > version
    return y, norm_out, mm_out, changed, in_place, norm_in_place


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("case, epsilon", NORM_CASES, ids=lambda value: str(value))
def test_mm_all_reduce_add_rms_norm(ranks, world_size, case, epsilon):
    results = ranks(world_size).run(run_add_rms_norm, case, epsilon)
    residual, gamma = norm_inputs(case)
    y, norm_out = results[0][:2]
    for rank, (y_r, norm_r, mm_out, changed, in_place, norm_in_place) in enumerate(results):
        assert torch.equal(y_r, y) and torch.equal(norm_r, norm_out), \
            f"rank {rank}'s y or norm_out differs from rank 0's"
        assert torch.equal(y_r, (mm_out.float().reshape(residual.shape) + residual.float())
                           .to(case.dtype)), f"rank {rank}: y is not round(mm_out + residual)"
        assert changed, f"rank {rank}: the in-place form did not return residual itself, " \
            "at a new version"
        assert torch.equal(in_place, y_r) and torch.equal(norm_in_place, norm_r), \
            f"rank {rank}: the in-place form differs from the functional one"
    assert y.dtype == norm_out.dtype == case.dtype
    assert y.shape == norm_out.shape == residual.shape
    mm_exact, mm_bound = reference(case, world_size)
    exact = mm_exact.reshape(residual.shape) + residual.double()
    check_within(y, exact, y_bound(case.dtype, exact, mm_bound.reshape(residual.shape)), "y")
    check_within(norm_out, *rms_norm_reference(y, gamma, epsilon), "norm_out")


# ---- layouts: what torch_npu code passes ----

def strided(tensor):
    """tensor's values, every other element of a buffer twice as wide in the last dim."""
    wide = torch.zeros(*tensor.shape[:-1], 2 * tensor.shape[-1], dtype=tensor.dtype)
    wide[..., ::2] = tensor
    return wide[..., ::2]


def expanded(tensor):
    """tensor's first value repeated over its shape, a view with stride 0."""
    return tensor.flatten()[:1].reshape([1] * tensor.dim()).expand(tensor.shape)


def relaid(arguments, layout):
    """The arguments (a dict of name: value) in `layout`: every tensor
    strided, or every tensor but x1 and x2 expanded."""
    out = {}
    for name, value in arguments.items():
        if isinstance(value, torch.Tensor):
            if layout == "strided":
                value = strided(value)
            elif name not in ("x1", "x2"):
                value = expanded(value)
        out[name] = value
    return out


def contiguous_copies(arguments):
    return {name: value.contiguous() if isinstance(value, torch.Tensor) else value
            for name, value in arguments.items()}


def layout_arguments(rank, op, case):
    if op == "mm_all_reduce_base":
        x1, x2, kwargs = make_inputs(case, rank)
        return {"x1": x1, "x2": x2, **kwargs}
    if op in ("all_gather", "reduce_scatter"):
        x1, x2, kwargs = make_sp_inputs(case, rank, op)
        return {"x1": x1, "x2": x2, **kwargs}
    x1, x2, kwargs = make_inputs(case, rank)
    residual, gamma = norm_inputs(case)
    return {"x1": x1, "x2": x2, "residual": residual, "gamma": gamma, **kwargs}


def call(op, arguments, world_size, in_place):
    hcom = tpfuse.get_comm_name()
    a = dict(arguments)
    x1, x2 = a.pop("x1"), a.pop("x2")
    if op == "mm_all_reduce_base":
        return (tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, **a),)
    if op == "all_gather":
        return tpfuse.npu_all_gather_base_mm(x1, x2, hcom, world_size, **a)
    if op == "reduce_scatter":
        return (tpfuse.npu_mm_reduce_scatter_base(x1, x2, hcom, world_size, **a),)
    residual, gamma = a.pop("residual"), a.pop("gamma")
    functional = tpfuse.npu_mm_all_reduce_add_rms_norm(x1, x2, residual, gamma, hcom, **a)
    if in_place:
        returned, norm_out = tpfuse.npu_mm_all_reduce_add_rms_norm_(x1, x2, residual, gamma,
                                                                    hcom, **a)
        assert returned is residual, "the in-place form did not return residual itself"
        return functional + (residual.clone(), norm_out)
    return functional


def run_in_layouts(rank, world_size, op, case, layout):
    given = relaid(layout_arguments(rank, op, case), layout)
    copies = contiguous_copies(given)
    # An expanded residual cannot take y in place.
    in_place = op == "add_rms_norm" and 0 not in given["residual"].stride()
    return call(op, given, world_size, in_place), call(op, copies, world_size, in_place)


LAYOUT_CASES = [
    ("mm_all_reduce_base", Case(mode="plain", dtype=F16, batch=2, bias=True, x3=True)),
    ("mm_all_reduce_base", Case(mode="weight_quant", dtype=BF16, scale="per_group",
                                group_size=32, offset=True, bias=True)),
    ("mm_all_reduce_base", Case(mode="full_quant", dtype=F16, scale="per_channel", bias=True,
                                x3=True)),
    ("all_gather", SPCase(dtype=BF16, bias=True)),
    ("all_gather", SPCase(quant=True, dtype=F16, x2_scale="f32", x1_scale=True, bias=True)),
    ("reduce_scatter", SPCase(dtype=F16, bias=True)),
    ("reduce_scatter", SPCase(quant=True, dtype=BF16, x2_scale="f32_2d", x1_scale=True)),
    ("add_rms_norm", Case(mode="plain", dtype=BF16, bias=True)),
    ("add_rms_norm", Case(mode="weight_quant", dtype=F16, scale="per_channel", offset=True)),
]


@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("op, case", LAYOUT_CASES, ids=lambda value: str(value))
def test_layouts_give_the_bits_of_contiguous_copies(ranks, op, case, layout):
    for rank, (given, copies) in enumerate(ranks(2).run(run_in_layouts, op, case, layout)):
        assert len(given) == len(copies)
        for got, expected in zip(given, copies):
            assert torch.equal(got, expected), f"{op}, rank {rank}: the {layout} call differs"


def strided_weight_calls(rank, world_size):
    x1, x2, kwargs = make_inputs(Case(mode="weight_quant", dtype=F16, seed=7), rank)
    hcom = tpfuse.get_comm_name()
    before = tpfuse.packed_weight_cache_info()
    first = tpfuse.npu_mm_all_reduce_base(x1, strided(x2), hcom, **kwargs)
    second = tpfuse.npu_mm_all_reduce_base(x1, strided(x2), hcom, **kwargs)
    after = tpfuse.packed_weight_cache_info()
    unchanged = all(after[key] == before[key] for key in ("entries", "hits", "misses"))
    return torch.equal(first, second), unchanged


def test_a_copied_weight_is_not_kept_packed(ranks):
    """A packing refers to the weight it was made from, and a strided weight's
    copy lives for one call: such calls pack afresh, with the same bits."""
    assert ranks(2).run(strided_weight_calls) == [(True, True)] * 2


# ---- errors ----

def call_with_error(rank, world_size, name):
    op, case, overrides, _ = ERRORS[name]
    arguments = {**layout_arguments(rank, op, case), **overrides}
    if op in ("all_gather", "reduce_scatter"):
        world_size = arguments.pop("world_size", world_size)
    try:
        call(op, arguments, world_size, in_place=False)
    except Exception as error:  # noqa: BLE001  (the test inspects it)
        return type(error).__name__, str(error)
    return None


# name: (operator, case, arguments replaced, expected message); every rank
# breaks the rule, rank 0 reports it and the others name rank 0.
ERRORS = {
    "all_gather_base_mm": (
        "all_gather", SPCase(dtype=BF16), {"world_size": 3},
        "world_size: expected the group's size 2, got 3"),
    "all_gather_base_mm output_dtype": (
        "all_gather", SPCase(dtype=BF16), {"output_dtype": F16},
        "output_dtype: expected none or bf16 (x1's dtype, plain mode), got f16"),
    "mm_reduce_scatter_base": (
        "reduce_scatter", SPCase(dtype=F16, m=9), {},
        "x1: expected m divisible by world_size (m % world_size == 0), got m = 9, "
        "world_size = 2"),
    "mm_all_reduce_add_rms_norm": (
        "add_rms_norm", Case(mode="plain", dtype=F16), {"epsilon": 1.0},
        "epsilon: expected a value in (0, 1), got 1"),
}
OPERATOR_NAMES = {"all_gather": "all_gather_base_mm", "reduce_scatter": "mm_reduce_scatter_base",
                  "add_rms_norm": "mm_all_reduce_add_rms_norm"}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_errors_reach_python_on_every_rank(ranks, name):
    op, _, _, message = ERRORS[name]
    outcomes = ranks(2).run(call_with_error, name)
    assert outcomes[0] == ("ValueError", message)
    kind, text = outcomes[1]
    assert kind == "RuntimeError" and text.startswith(
        f"{OPERATOR_NAMES[op]}: rank 0 rejected its arguments ({message})"), text
