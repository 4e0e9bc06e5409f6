"""Backend "cuda": PyTorch's fused CUDA flash op per block, merged by seqpar's compiled merge.

Each block runs through the calls of backend "sdpa" (`backends/sdpa.py`, PyTorch's CUDA
flash-attention op, in pieces), and the partial results are merged by seqpar's compiled
fused merge (`csrc/merge.cu`, through `cuda_ext.merge_`: one kernel reading and writing
each accumulator element once, where `merge.merge_` launches about ten torch kernels). It
is available when the extension was built (setup.py, `SEQPAR_BUILD_CUDA`), torch sees a
CUDA device, the tensors are on it, the dtype is float16 or bfloat16 (what the flash op
takes), `head_dim` is a multiple of 8 and at most 256, and `softmax_scale > 0`;
`unavailable_reason` says which condition fails.

`merge` is the custom op `seqpar::merge_` (`torch.ops.seqpar.merge_`), so that it is one
node under torch.compile: the compiled kernel where it serves the tensors, the torch
formula elsewhere (any device; `cuda_ext.merge_` decides).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import cuda_ext
from . import sdpa

_HALF = (torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the largest head dim of PyTorch's CUDA flash kernel

forward = sdpa.forward
backward = sdpa.backward


@torch.library.custom_op("seqpar::merge_", mutates_args=("out", "lse"))
def merge(out: Tensor, lse: Tensor, part_out: Tensor, part_lse: Tensor) -> None:
    """`kernels.merge.merge_` as an op: the compiled CUDA kernel where it serves the
    tensors (`cuda_ext.merge_`), the torch formula elsewhere."""
    cuda_ext.merge_(out, lse, part_out, part_lse)


@merge.register_fake
def _merge_fake(out, lse, part_out, part_lse):
    cuda_ext.check_merge_args(out, lse, part_out, part_lse)


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0) -> Optional[str]:
    """Why `backend="cuda"` cannot serve this case on this machine, or None when it can."""
    if not cuda_ext.built():
        return ("cuda needs the compiled extension seqpar._C, which does not import "
                f"({cuda_ext.load_error()}); build it with SEQPAR_BUILD_CUDA=1 (a CUDA build of torch and nvcc)")
    if not torch.cuda.is_available():
        return "cuda needs a CUDA device, got torch.cuda.is_available() == False"
    if torch.device(device).type != "cuda":
        return f"cuda needs tensors on a CUDA device, got {torch.device(device).type}"
    if dtype not in _HALF:
        return f"cuda needs float16 or bfloat16 (PyTorch's flash op), got {dtype}"
    if head_dim > _MAX_HEAD_DIM or head_dim % 8:
        return f"cuda needs head_dim a multiple of 8 and <= {_MAX_HEAD_DIM} (PyTorch's flash op), got {head_dim}"
    if scale <= 0:
        return f"cuda needs softmax_scale > 0, got {scale} (backend='torch' serves it)"
    return None
