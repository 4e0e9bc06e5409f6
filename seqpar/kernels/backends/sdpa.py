"""Backend "sdpa": PyTorch's fused flash-attention ops that return the log-sum-exp.

The CPU op (`_scaled_dot_product_flash_attention_for_cpu`, any float dtype; fp16/bf16 run
in fp32, see `_cpu_fp32`) and the CUDA op (`_scaled_dot_product_flash_attention`, fp16 and
bf16, head dims that are multiples of 8 up to 256) take only "no mask" and "square causal",
so an offset block runs as pieces (`pieces.py`). GQA: an unmasked piece folds a group of
query heads into extra query rows; a causal piece calls the op once per member of the
group (its mask depends on the row). Merged by the reference merge. On CUDA the same
blocks with seqpar's compiled merge are backend "cuda" (`backends/cuda.py`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ..memory import acc_dtype, unit_stride
from ..pieces import causal_tree, causal_tree_backward, causal_tree_forward, pieces_backward, pieces_forward



def takes_precise_out(device: torch.device) -> bool:
    """On CPU the backward runs in fp32 and takes an fp32 `out`; CUDA's flash op wants the
    input dtype."""
    return device.type == "cpu"

def _bhsd(x):
    return x.transpose(1, 2)


def _fold_groups(q, h_kv):
    """[B, n, H, D] -> [B, H_kv, G*n, D]: a GQA group becomes extra query rows."""
    b, n, h, d = q.shape
    g = h // h_kv
    return q.reshape(b, n, h_kv, g, d).permute(0, 2, 3, 1, 4).reshape(b, h_kv, g * n, d)


def _unfold_groups(x, n, h):
    """[B, H_kv, G*n, D] -> [B, n, H, D]."""
    b, h_kv, _, d = x.shape
    return x.reshape(b, h_kv, h // h_kv, n, d).permute(0, 3, 1, 2, 4).reshape(b, n, h, d)


def _cpu_fp32(*tensors):
    """fp16/bf16 blocks run PyTorch's CPU flash op in fp32. Its fp16/bf16 variants return
    each block's output rounded to the input dtype, so a merge of partials would round the
    final output twice; on CPUs the fp32 op is also about as fast for bf16 and 10x faster
    for the fp16 backward (2-core AVX-512 VM, 1024 tokens x 8 heads). Outputs and gradients
    come back in fp32, as the Triton kernels' do; the merges and accumulators are fp32."""
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def _cpu_flash_fwd(q, k, v, scale, causal):
    q, k, v = _cpu_fp32(q, k, v)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=None, scale=scale
    )
    return out, lse


def _cpu_flash_bwd(do, q, k, v, out, lse, scale, causal):
    do, q, k, v, out = _cpu_fp32(do, q, k, v, out)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse.to(q.dtype), 0.0, causal, attn_mask=None, scale=scale
    )


def _cuda_flash_fwd(q, k, v, scale, causal):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


@functools.lru_cache(maxsize=None)
def _dense_bwd_extras(device: torch.device):
    """The cumulative-length and RNG arguments of the CUDA flash backward for dense (not
    varlen) inputs, exactly as the forward returns them, as PyTorch's own autograd passes
    them back. A placeholder of our own would be wrong: a defined cumulative-length tensor
    selects the varlen kernel (torch 2.11 then fails with 'cu_seqlens_q must have dtype
    int32'), and the RNG tensors' dtype differs between versions."""
    x = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16, device=device)
    res = torch.ops.aten._scaled_dot_product_flash_attention(x, x, x, 0.0, False, False, scale=1.0)
    return res[2], res[3], res[6], res[7]


def _cuda_flash_bwd(do, q, k, v, out, lse, scale, causal):
    cum_q, cum_k, seed, offset = _dense_bwd_extras(q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, cum_q, cum_k, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale
    )


def _sdpa_ops(device: torch.device):
    return (_cpu_flash_fwd, _cpu_flash_bwd) if device.type == "cpu" else (_cuda_flash_fwd, _cuda_flash_bwd)


# Square causal pieces on CPU run as a tree of smaller calls (`pieces.causal_tree`) where
# that timed faster than one call: PyTorch's CPU op computes a small causal call almost as
# if it were unmasked. One thread, 8 heads x 64, fp32, ms. Forward: one call and the tree
# alternated, 12-26 pairs, median time and median of the paired ratios (tree / one call):
#   rows     384    512    640    768    896   1024   1536   2048
#   one     4.22   7.58   9.89  12.28  16.58  20.28  41.75  69.30
#   tree    4.33   7.20  10.10  12.76  17.09  19.16  43.43  68.08
#   ratio  1.022  0.953  1.023  1.029  1.030  0.946  1.038  0.980
# so the forward takes the tree only where it is whole leaves doubled (no tail rows) from
# 512 to 2048 rows (two threads: even at 512-1024, 4% slower at 2048). Backward, medians
# of 9 (repeats on this 2-core VM varied 10-20%), one call -> tree:
#   rows      256         512          1024         1536        2048
#           4.4 -> 3.3  18.0 -> 11.1  51.7 -> 41.7  108 -> 96-100  173 -> 153
# (two threads alike), so every backward piece from 256 rows takes it (CPU backward tiles
# have at most 1024). Leaves of 128 rows timed within a few % of 64.
CPU_CAUSAL_LEAF = 64
CPU_TREE_FORWARD_ROWS = (512, 2048)
CPU_TREE_BACKWARD_ROWS = 256


def forward_takes_tree(rows: int) -> bool:
    """Whether a square causal CPU piece of `rows` rows runs its forward as a tree."""
    lo, hi = CPU_TREE_FORWARD_ROWS
    return lo <= rows <= hi and causal_tree(rows, CPU_CAUSAL_LEAF)[0] == rows


def _piece_forward(q, k, v, scale, causal):
    """One unmasked or square-causal piece through the fused op; bshd in and out."""
    if causal and q.device.type == "cpu" and forward_takes_tree(q.shape[1]):
        return causal_tree_forward(_piece_forward, q, k, v, scale, CPU_CAUSAL_LEAF)
    fwd, _ = _sdpa_ops(q.device)
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    if h == h_kv:
        out, lse = fwd(_bhsd(q), _bhsd(k), _bhsd(v), scale, causal)
        return _bhsd(out), lse
    if not causal:
        out, lse = fwd(_fold_groups(q, h_kv), _bhsd(k), _bhsd(v), scale, False)
        return _unfold_groups(out, n, h), lse.reshape(b, h, n)
    # causal GQA: the mask depends on the row, so one call per member of the group
    g = h // h_kv
    qg = q.reshape(b, n, h_kv, g, d)
    outs, lses = zip(*(fwd(_bhsd(qg[:, :, :, i]), _bhsd(k), _bhsd(v), scale, True) for i in range(g)))
    out = torch.stack([_bhsd(o) for o in outs], dim=3).reshape(b, n, h, d)
    return out, torch.stack(lses, dim=2).reshape(b, h, n)


def _piece_backward(do, q, k, v, out, lse, scale, causal):
    if causal and q.device.type == "cpu" and q.shape[1] >= CPU_TREE_BACKWARD_ROWS:
        return causal_tree_backward(_piece_backward, do, q, k, v, out, lse, scale, CPU_CAUSAL_LEAF)
    _, bwd = _sdpa_ops(q.device)
    do, q, k, v, out = (unit_stride(t) for t in (do, q, k, v, out))
    b, n, h, d = q.shape
    h_kv = k.shape[2]
    kb, vb = _bhsd(k), _bhsd(v)
    if h == h_kv:
        dq, dk, dv = bwd(_bhsd(do), _bhsd(q), kb, vb, _bhsd(out), lse.contiguous(), scale, causal)
        return _bhsd(dq), _bhsd(dk), _bhsd(dv)
    if not causal:
        dq, dk, dv = bwd(
            _fold_groups(do, h_kv), _fold_groups(q, h_kv), kb, vb, _fold_groups(out, h_kv),
            lse.reshape(b, h_kv, -1).contiguous(), scale, False,
        )
        return _unfold_groups(dq, n, h), _bhsd(dk), _bhsd(dv)
    g = h // h_kv
    shape = (b, n, h_kv, g, d)
    qg, dog, outg = q.reshape(shape), do.reshape(shape), out.reshape(shape)
    lseg = lse.reshape(b, h_kv, g, n)
    dqs, dk, dv = [], None, None
    for i in range(g):
        dq_i, dk_i, dv_i = bwd(
            _bhsd(dog[:, :, :, i]), _bhsd(qg[:, :, :, i]), kb, vb, _bhsd(outg[:, :, :, i]),
            lseg[:, :, i].contiguous(), scale, True,
        )
        dqs.append(_bhsd(dq_i))
        dk = _bhsd(dk_i).to(acc_dtype(q.dtype)) if dk is None else dk + _bhsd(dk_i)
        dv = _bhsd(dv_i).to(acc_dtype(q.dtype)) if dv is None else dv + _bhsd(dv_i)
    return torch.stack(dqs, dim=3).reshape(b, n, h, d), dk, dv


def forward(q, k, v, scale, offset):
    return pieces_forward(_piece_forward, q, k, v, scale, offset)


def backward(do, q, k, v, out, lse, scale, offset):
    return pieces_backward(_piece_backward, do, q, k, v, out, lse, scale, offset)


merge = None  # the reference merge


def cuda_flash_head_dim_reason(head_dim: int) -> Optional[str]:
    """PyTorch's CUDA flash op (called directly, as here, not through F.sdpa, which pads)
    takes head dims that are multiples of 8, up to 256."""
    if head_dim % 8 or head_dim > 256:
        return f"the CUDA flash op needs head_dim a multiple of 8 and <= 256, got {head_dim} (backend='triton' serves it)"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0) -> Optional[str]:
    if scale <= 0:
        # PyTorch's fused CPU kernel returns NaN for causal blocks with scale <= 0
        return f"sdpa needs softmax_scale > 0, got {scale} (backend='torch' serves it)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if dtype not in (torch.float16, torch.bfloat16):
            return f"sdpa on CUDA needs float16 or bfloat16 (the flash op), got {dtype}"
        return cuda_flash_head_dim_reason(head_dim)
    return f"sdpa supports cpu and cuda devices, got {device.type}"
