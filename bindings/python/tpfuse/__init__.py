"""tpfuse for PyTorch: torch_npu's npu_mm_all_reduce_base on CPU tensors.

Ranks are processes of a torch.distributed group (gloo) on one host; the
operator multiplies each rank's K-slice and all-reduces the partials through
shared memory, overlapping the two. Code written for torch_npu changes its
import and the line that names the communicator:

    import tpfuse
    hcom = tpfuse.get_comm_name(group)   # torch_npu: group.get_hccl_comm_name(rank)
    out = tpfuse.npu_mm_all_reduce_base(x1, x2, hcom, reduce_op="sum", bias=bias)

The rest of the family takes torch_npu's (MindSpeed's) arguments too:
npu_all_gather_base_mm and npu_mm_reduce_scatter_base (sequence parallelism;
plain mode differentiates, each backward using the other operator) and
npu_mm_all_reduce_add_rms_norm(_) (the row-parallel linear, the residual add
and the next RMSNorm).

The operators are also torch.ops.tpfuse.<name without npu_>, and
torch.ops.tpfuse.trans_quant_param.
"""
import pathlib

import torch

torch.ops.load_library(str(pathlib.Path(__file__).with_name("_tpfuse_torch.so")))

from tpfuse._version import __version__  # noqa: E402
from tpfuse.comm import comm_info, get_comm_name  # noqa: E402  (needs the operators loaded)
from tpfuse.ops import (  # noqa: E402
    mm_all_reduce_base,
    npu_all_gather_base_mm,
    npu_mm_all_reduce_add_rms_norm,
    npu_mm_all_reduce_add_rms_norm_,
    npu_mm_all_reduce_base,
    npu_mm_reduce_scatter_base,
    npu_trans_quant_param,
    packed_weight_cache_info,
)

__all__ = [
    "__version__",
    "comm_info",
    "get_comm_name",
    "mm_all_reduce_base",
    "npu_all_gather_base_mm",
    "npu_mm_all_reduce_add_rms_norm",
    "npu_mm_all_reduce_add_rms_norm_",
    "npu_mm_all_reduce_base",
    "npu_mm_reduce_scatter_base",
    "npu_trans_quant_param",
    "packed_weight_cache_info",
]
