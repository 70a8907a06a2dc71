"""torch_npu's (and MindSpeed's) operator signatures over the torch.ops.tpfuse operators.

The functions only name the arguments as torch_npu does; validation, the
collective and autograd (plain mode) live in the operators themselves.
Tensors may come as torch_npu code passes them (slices, transposes,
expanded): x2 is read in place when it is row-major or a transposed view of
a row-major [n, k], any other tensor that is not contiguous is copied first.
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


def npu_all_gather_base_mm(x1, x2, hcom, world_size, *, bias=None, x1_scale=None,
                           x2_scale=None, gather_index=0, gather_output=True, comm_turn=0,
                           output_dtype=None, comm_mode=None):
    """(gather(x1) @ x2 + bias, gather(x1)): sequence parallelism's column-parallel linear.

    Every rank of the group `hcom` (of world_size ranks) calls it collectively
    with its rows of the activations (x1: [m, k]) and its columns of the
    weight (x2: [k, n], or a transposed view of a row-major [n, k]; n may
    differ per rank). gather_out is every rank's x1 in rank order ([p*m, k],
    the same on every rank; an empty [0] tensor with gather_output=False) and
    output = gather_out @ x2 + bias ([p*m, n], x1's dtype). Quant path (x1
    and x2 int8): int32 bias, x1_scale [m, 1] float32 per token, x2_scale
    [n] or [1, n] float32 or int64 from npu_trans_quant_param; the output is
    float16 with an int64 x2_scale, else output_dtype (torch.float16 or
    torch.bfloat16, default bfloat16). gather_index must be 0; comm_mode
    (None, "ai_cpu", "aiv") does not change the result.

    Plain mode supports autograd: x1's gradient is a npu_mm_reduce_scatter_base
    of the output's (collective: every rank runs the backward, needing the
    same gradients), x2's and bias's are local; gather_out has none.
    """
    return torch.ops.tpfuse.all_gather_base_mm(
        x1, x2, hcom, world_size, bias=bias, x1_scale=x1_scale, x2_scale=x2_scale,
        gather_index=gather_index, gather_output=gather_output, comm_turn=comm_turn,
        output_dtype=output_dtype, comm_mode=comm_mode)


def npu_mm_reduce_scatter_base(x1, x2, hcom, world_size, *, reduce_op="sum", bias=None,
                               x1_scale=None, x2_scale=None, comm_turn=0, output_dtype=None,
                               comm_mode=None):
    """Rank r's rows of sum over ranks of (x1 @ x2 + bias): the row-parallel linear under SP.

    Every rank of the group `hcom` calls it collectively with its K-slice
    (x1: [m, k], x2: [k, n] or a transposed view of a row-major [n, k]; m a
    multiple of world_size); rank r gets rows [r*m/p, (r+1)*m/p), bitwise
    those rows of npu_mm_all_reduce_base's output. bias is added on every
    rank, before the reduce. The quant path, output_dtype and comm_mode are
    as in npu_all_gather_base_mm; reduce_op "sum" only.

    Plain mode supports autograd: the backward all-gathers the output's
    gradient with npu_all_gather_base_mm (collective, as above).
    """
    return torch.ops.tpfuse.mm_reduce_scatter_base(
        x1, x2, hcom, world_size, reduce_op=reduce_op, bias=bias, x1_scale=x1_scale,
        x2_scale=x2_scale, comm_turn=comm_turn, output_dtype=output_dtype, comm_mode=comm_mode)


def npu_mm_all_reduce_add_rms_norm(x1, x2, residual, gamma, hcom, *, reduce_op="sum",
                                   epsilon=1e-06, bias=None, antiquant_scale=None,
                                   antiquant_offset=None, dequant_scale=None,
                                   antiquant_group_size=0, comm_turn=0):
    """(y, norm_out): y = npu_mm_all_reduce_base(x1, x2, ...) + residual, norm_out = rms_norm(y).

    Every rank of the group `hcom` calls it collectively, with the arguments
    (and modes) of npu_mm_all_reduce_base, without x3. residual is [b, s, n]
    with b*s = x1's rows, gamma [n]; y and norm_out have residual's shape and
    dtype, and are the same on every rank. norm_out = y / sqrt(mean(y^2) +
    epsilon) * gamma over the last dim, epsilon in (0, 1). No backward: a
    tensor that requires grad is an error.
    """
    return torch.ops.tpfuse.mm_all_reduce_add_rms_norm(
        x1, x2, residual, gamma, hcom, reduce_op=reduce_op, epsilon=epsilon, bias=bias,
        antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
        dequant_scale=dequant_scale, antiquant_group_size=antiquant_group_size,
        comm_turn=comm_turn)


def npu_mm_all_reduce_add_rms_norm_(x1, x2, residual, gamma, hcom, *, reduce_op="sum",
                                    epsilon=1e-06, bias=None, antiquant_scale=None,
                                    antiquant_offset=None, dequant_scale=None,
                                    antiquant_group_size=0, comm_turn=0):
    """npu_mm_all_reduce_add_rms_norm writing y into residual: returns (residual, norm_out)."""
    return torch.ops.tpfuse.mm_all_reduce_add_rms_norm_(
        x1, x2, residual, gamma, hcom, reduce_op=reduce_op, epsilon=epsilon, bias=bias,
        antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
        dequant_scale=dequant_scale, antiquant_group_size=antiquant_group_size,
        comm_turn=comm_turn)


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
