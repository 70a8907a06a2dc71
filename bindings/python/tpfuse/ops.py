"""torch_npu's operator signatures over the torch.ops.tpfuse operators.

The functions only name the arguments as torch_npu does; validation, the
collective and autograd (plain mode) live in the operators themselves.
"""
import torch


def npu_mm_all_reduce_base(x1, x2, hcom, *, reduce_op="sum", bias=None,
                           antiquant_scale=None, antiquant_offset=None, x3=None,
                           dequant_scale=None, comm_turn=0, antiquant_group_size=0):
    """Sum over the ranks of group `hcom` of x1 @ x2 (+ bias + x3), identical on every rank.

    Every rank of the group calls it collectively, with its K-slice of the
    activations (x1: [m, k] or [b, s, k]) and of the weight (x2: [k, n], or a
    transposed view of a row-major [n, k]). The mode follows the dtypes:
    plain (x1, x2 float16 or bfloat16), weight-only quant (x2 int8, with
    antiquant_scale and optional antiquant_offset, per-tensor, per-channel or
    per-group of antiquant_group_size rows) and full quant (x1, x2 int8,
    int32 bias, dequant_scale int64 from npu_trans_quant_param for a float16
    output or bfloat16 for a bfloat16 output). bias and x3 are added on every
    rank before the reduce. comm_turn=0 lets tpfuse tile the output; N > 0
    asks for N tiles along M. Plain mode supports autograd.

    Raises ValueError for arguments the contract rejects and RuntimeError when
    the ranks disagree or communication fails, with the library's message.
    """
    return torch.ops.tpfuse.mm_all_reduce_base(
        x1, x2, hcom, reduce_op=reduce_op, bias=bias, antiquant_scale=antiquant_scale,
        antiquant_offset=antiquant_offset, x3=x3, dequant_scale=dequant_scale,
        comm_turn=comm_turn, antiquant_group_size=antiquant_group_size)


mm_all_reduce_base = npu_mm_all_reduce_base


def npu_trans_quant_param(scale, offset=None):
    """Packs float32 dequant scales (shape [n] or [1, n]) into int64, bit for bit as torch_npu.

    Each value is (bits(scale) & 0xFFFFE000) | 1 << 46, with an optional
    offset rounded (ties to even), clamped to [-256, 255] and kept in bits
    37..45. scale and offset broadcast against each other when one has length 1.
    """
    return torch.ops.tpfuse.trans_quant_param(scale, offset)


def packed_weight_cache_info():
    """What the weights kept packed between calls hold: a dict of entries, bytes, hits and misses.

    The first call with a weight packs it (for this CPU's GEMM engine); later
    calls with the same tensor, unchanged (same storage and version), reuse
    the packing. TPFUSE_PACK_CACHE_MB bounds the memory (0: no cache).
    """
    entries, nbytes, hits, misses = torch.ops.tpfuse._packed_weight_cache_info()
    return {"entries": entries, "bytes": nbytes, "hits": hits, "misses": misses}
