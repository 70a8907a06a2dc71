"""Every validation error of the contract reaches Python as ValueError with the
library's message (no C++ backtrace); collective failures (ranks that
disagree, a rank that rejects its arguments) as RuntimeError on the others;
and the communicator keeps working after any of them."""
import pytest
import torch

import tpfuse

F16, BF16, I8 = torch.float16, torch.bfloat16, torch.int8
M, K, N = 8, 64, 16


def t(dtype, *shape):
    return torch.ones(shape, dtype=dtype)


def plain(**kwargs):
    return dict(x1=t(F16, M, K), x2=t(F16, K, N), **kwargs)


def weight_quant(**kwargs):
    return dict(x1=t(F16, M, K), x2=t(I8, K, N), **{"antiquant_scale": t(F16, N), **kwargs})


def full_quant(**kwargs):
    return dict(x1=t(I8, M, K), x2=t(I8, K, N),
                **{"dequant_scale": tpfuse.npu_trans_quant_param(t(torch.float32, N)), **kwargs})


# name: (arguments, expected start of the message). Each builder runs on the rank.
ERRORS = {
    "reduce_op": (lambda: plain(reduce_op="max"),
                  'reduce_op: only "sum" is supported, got "max"'),
    "comm_turn negative": (lambda: plain(comm_turn=-1), "comm_turn: expected >= 0"),
    "x1 1-D": (lambda: dict(x1=t(F16, K), x2=t(F16, K, N)),
               "x1: expected 2-D [m, k] or 3-D [b, s, k], got [64] f16"),
    "x1 empty": (lambda: dict(x1=t(F16, 0, K), x2=t(F16, K, N)),
                 "x1: expected every dim >= 1 (x1 cannot be empty), got [0, 64] f16"),
    "x2 3-D": (lambda: dict(x1=t(F16, M, K), x2=t(F16, 1, K, N)), "x2: expected 2-D [k, n]"),
    "x2 empty": (lambda: dict(x1=t(F16, M, K), x2=t(F16, K, 0)),
                 "x2: expected every dim >= 1 (x2 cannot be empty)"),
    "x2 k mismatch": (lambda: dict(x1=t(F16, M, K), x2=t(F16, K + 1, N)),
                      "x2: expected dim 0 equal to x1's last dim k = 64, got [65, 16] f16"),
    "x2 dtype": (lambda: dict(x1=t(F16, M, K), x2=t(BF16, K, N)),
                 "x2: expected dtype f16 (plain mode, same as x1) or i8 (weight-only quant), "
                 "got bf16"),
    "x1 dtype": (lambda: dict(x1=t(torch.float32, M, K), x2=t(torch.float32, K, N)),
                 "x1: expected dtype f16, bf16 (plain or weight-only quant) or i8 (full quant), "
                 "got f32"),
    "x2 dtype in full quant": (lambda: dict(x1=t(I8, M, K), x2=t(F16, K, N)),
                               "x2: expected dtype i8 (full quant, since x1 is i8), got f16"),
    "bias shape": (lambda: plain(bias=t(F16, N + 1)), "bias: expected shape [16] (n), got [17] f16"),
    "bias dtype": (lambda: plain(bias=t(BF16, N)), "bias: expected dtype f16 (same as x1), got bf16"),
    "bias dtype in full quant": (lambda: full_quant(bias=t(F16, N)),
                                 "bias: expected dtype i32 (full quant), got f16"),
    "x3 shape": (lambda: plain(x3=t(F16, M, N + 1)),
                 "x3: expected shape [8, 16] (the output's shape), got [8, 17] f16"),
    "x3 dtype": (lambda: plain(x3=t(BF16, M, N)), "x3: expected dtype f16 (same as x1), got bf16"),
    "x3 dtype in full quant": (lambda: full_quant(x3=t(BF16, M, N)),
                               "x3: expected dtype f16 (the output dtype), got bf16"),
    "plain with antiquant_scale": (lambda: plain(antiquant_scale=t(F16, N)),
                                   "antiquant_scale: expected none in plain mode (x1 f16, x2 f16)"),
    "plain with antiquant_offset": (lambda: plain(antiquant_offset=t(F16, N)),
                                    "antiquant_offset: expected none in plain mode"),
    "plain with dequant_scale": (lambda: plain(dequant_scale=t(torch.int64, N)),
                                 "dequant_scale: expected none in plain mode"),
    "plain with group size": (lambda: plain(antiquant_group_size=32),
                              "antiquant_group_size: expected 0 in plain mode (x1 f16, x2 f16), "
                              "got 32"),
    "weight quant without scale": (
        lambda: dict(x1=t(F16, M, K), x2=t(I8, K, N)),
        "antiquant_scale: expected a tensor of dtype f16, required in weight-only quant mode"),
    "weight quant offset without scale": (
        lambda: dict(x1=t(F16, M, K), x2=t(I8, K, N), antiquant_offset=t(F16, N)),
        "antiquant_offset: expected only together with antiquant_scale"),
    "weight quant scale dtype": (lambda: weight_quant(antiquant_scale=t(BF16, N)),
                                 "antiquant_scale: expected dtype f16 (same as x1), got bf16"),
    "weight quant scale shape": (lambda: weight_quant(antiquant_scale=t(F16, N + 1)),
                                 "antiquant_scale: expected shape [1] (per-tensor), [16] or "
                                 "[1, 16] (per-channel"),
    "weight quant group size": (lambda: weight_quant(antiquant_scale=t(F16, 2, N),
                                                     antiquant_group_size=48),
                                "antiquant_group_size: expected a multiple of 32 in [32, k-1] = "
                                "[32, 63], got 48"),
    "weight quant group scale shape": (lambda: weight_quant(antiquant_scale=t(F16, 3, N),
                                                            antiquant_group_size=32),
                                       "antiquant_scale: expected shape [2, 16] ([ceil(k/G), n] "
                                       "for antiquant_group_size G = 32)"),
    "weight quant offset shape": (lambda: weight_quant(antiquant_offset=t(F16, 1, N)),
                                  "antiquant_offset: expected [16] f16 (same shape and dtype as "
                                  "antiquant_scale), got [1, 16] f16"),
    "weight quant with dequant_scale": (lambda: weight_quant(dequant_scale=t(torch.int64, N)),
                                        "dequant_scale: expected none in weight-only quant mode"),
    "full quant without dequant_scale": (lambda: dict(x1=t(I8, M, K), x2=t(I8, K, N)),
                                         "dequant_scale: expected an i64 tensor (packed by "
                                         "trans_quant_param, f16 output) or a bf16 one"),
    "full quant dequant_scale dtype": (lambda: full_quant(dequant_scale=t(torch.float32, N)),
                                       "dequant_scale: expected dtype i64 (packed, f16 output) or "
                                       "bf16 (bf16 output), got f32"),
    "full quant dequant_scale shape": (lambda: full_quant(dequant_scale=t(torch.int64, 2, N)),
                                       "dequant_scale: expected shape [1] (per-tensor), [16] or "
                                       "[1, 16] (per-channel), got [2, 16] i64"),
    "full quant with antiquant_scale": (lambda: full_quant(antiquant_scale=t(F16, N)),
                                        "antiquant_scale: expected none in full quant mode"),
    "full quant with group size": (lambda: full_quant(antiquant_group_size=32),
                                   "antiquant_group_size: expected 0 in full quant mode"),
    "full quant k too large": (lambda: dict(x1=t(I8, 1, 65536), x2=t(I8, 65536, 1),
                                            dequant_scale=t(torch.int64, 1)),
                               "x1: expected k <= 65535 in full quant mode (int32 accumulation "
                               "of int8 products), got k = 65536"),
    "hcom unknown": (lambda: plain(hcom="no-such-group"),
                     'hcom: no communicator named "no-such-group" in this process'),
    "x1 float64": (lambda: dict(x1=t(torch.float64, M, K), x2=t(F16, K, N)),
                   "x1: dtype Double has no tpfuse equivalent"),
    "x1 5-D": (lambda: dict(x1=t(F16, 1, 1, 1, M, K), x2=t(F16, K, N)),
               "x1: expected at most 4 dims, got 5"),
}


def call(arguments):
    arguments = dict(arguments)
    hcom = arguments.pop("hcom", tpfuse.get_comm_name())
    return tpfuse.npu_mm_all_reduce_base(arguments.pop("x1"), arguments.pop("x2"), hcom,
                                         **arguments)


def outcome(thunk):
    """(exception type name, message), or None when the call succeeded."""
    try:
        thunk()
    except Exception as error:  # noqa: BLE001  (the test inspects it)
        return type(error).__name__, str(error)
    return None


def call_named_error(rank, world_size, name):
    build, _ = ERRORS[name]
    return outcome(lambda: call(build()))


def plain_call_works(rank, world_size):
    out = call(plain())
    return bool((out.float() == K * world_size).all())


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_validation_error_reaches_python(ranks, name):
    [(kind, message)] = ranks(1).run(call_named_error, name)
    assert kind == "ValueError"
    assert message.startswith(ERRORS[name][1]), message
    assert "Exception raised from" not in message
    assert ranks(1).run(plain_call_works) == [True]


def call_with_disagreeing_n(rank, world_size):
    return outcome(lambda: call(dict(x1=t(F16, M, K), x2=t(F16, K, N + 8 * rank))))


def call_with_bad_bias_on_last_rank(rank, world_size):
    bias = t(F16, N + 1 if rank == world_size - 1 else N)
    return outcome(lambda: call(plain(bias=bias)))


def test_disagreement_is_an_error_on_every_rank(ranks):
    for kind, message in ranks(2).run(call_with_disagreeing_n):
        assert kind == "RuntimeError"
        assert message.startswith("mm_all_reduce_base: ranks disagree on n: rank 0 has 16, "
                                  "rank 1 has 24"), message
    assert ranks(2).run(plain_call_works) == [True, True]


def test_a_rank_that_rejects_its_arguments_fails_every_rank(ranks):
    outcomes = ranks(4).run(call_with_bad_bias_on_last_rank)
    assert outcomes[3] == ("ValueError", "bias: expected shape [16] (n), got [17] f16")
    for kind, message in outcomes[:3]:
        assert kind == "RuntimeError"
        assert message.startswith("mm_all_reduce_base: rank 3 rejected its arguments (bias: "
                                  "expected shape [16] (n), got [17] f16)"), message
    assert ranks(4).run(plain_call_works) == [True] * 4


def test_unsupported_keyword_is_a_type_error():
    with pytest.raises(TypeError):
        tpfuse.npu_mm_all_reduce_base(t(F16, M, K), t(F16, K, N), "hcom", no_such_argument=1)
