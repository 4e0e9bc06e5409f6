"""Block attention: a query block over a key block, returning `(out, lse)`, and its backward.

Every exact strategy is built from these two calls. Shapes: `q` `[B, nq, H, D]`,
`k`/`v` `[B, nk, H_kv, D]` with `H % H_kv == 0` (GQA by head groups; K/V are never
repeated per query head). `lse` is `[B, H, nq]` in fp32 (fp64 for fp64 inputs).

The mask of a block is `offset`: `None` (every key visible) or an int (key j visible to
query i iff `j <= i + offset`). Fused kernels only know "no mask" and "square causal",
so `square_pieces` cuts any offset block into at most three such pieces, exactly.

The backward takes the *final* `out` and `lse` of the query rows (after all blocks were
merged): then `exp(s - lse)` are the global probabilities and the block's gradients are
its exact share of the dense gradients (the flash-attention backward identity).

Memory layout: every backend takes q, k, v, out and dO with any strides. PyTorch's fused
flash ops (CPU and CUDA) and flash-attn read the head dim as if its stride were 1 (a
`x[..., ::2]` view or a `[B, n, D, H]` buffer seen as `[B, n, H, D]` came back as garbage),
so their pieces copy exactly the tensors whose `stride(-1) != 1` (`unit_stride`), once,
here; the common layouts pay nothing.

NaN rule, every backend and block size: NaN in, NaN out in every row that depends on it.
A NaN in query row i makes output row i and its lse NaN; a NaN in key j makes every row
that sees key j NaN (out and lse); a NaN in value j makes the output of every row that
sees key j NaN. The merge keeps a NaN lse or output NaN. (A row that sees no key returns
zeros whatever its query holds; rows that do not see a NaN value may still come back NaN
when it shares their block, through 0 * NaN in the product with V, as in PyTorch's SDPA.)
PyTorch's CPU flash op breaks the rule by itself: a row whose visible scores are all NaN
and fewer than one vector (16 fp32 / 8 fp64 keys on AVX-512, e.g. every row near the
start of a causal piece) takes a scalar max that skips NaN, looks fully masked and returns
out = 0, lse = 0. `_nan_rows_` restores the rule for the fused pieces from the inputs' NaN
rows (one pass over q, k and out; no host sync).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch

from .merge import merge_

BACKENDS = ("auto", "torch", "sdpa", "triton", "flash_attn", "cuda")

Piece = Tuple[int, int, int, int, bool]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def square_pieces(nq: int, nk: int, offset: Optional[int]) -> List[Piece]:
    """Cut an offset-masked `[nq, nk]` block into unmasked and square-causal pieces.

    Returns `(q0, q1, k0, k1, causal)`; `causal` pieces are square (`q1-q0 == k1-k0`)
    with key j visible to query i iff `j <= i`. Rows that see no key are in no piece.
    """
    if nq == 0 or nk == 0:
        return []
    if offset is None or offset >= nk - 1:
        return [(0, nq, 0, nk, False)]
    first_row = max(0, -offset)
    if first_row >= nq:
        return []
    # keys [0, shared) are visible to every row from first_row on
    shared = first_row + offset
    stair = min(nq - first_row, nk - shared)
    pieces: List[Piece] = []
    if shared > 0:
        pieces.append((first_row, first_row + stair, 0, shared, False))
    pieces.append((first_row, first_row + stair, shared, shared + stair, True))
    if first_row + stair < nq:
        pieces.append((first_row + stair, nq, 0, nk, False))
    return pieces


# -- torch: reference math, any device and dtype, any offset ----------------------------

_ROW_CHUNK_ELEMENTS = 1 << 25  # scores per chunk (128 MiB in fp32)


def _row_chunks(q: torch.Tensor, nk: int):
    b, nq, h, _ = q.shape
    rows = max(1, _ROW_CHUNK_ELEMENTS // max(1, b * h * nk))
    for start in range(0, nq, rows):
        yield start, min(nq, start + rows)


def _scores(q, k, scale, offset, row0, acc):
    # q [B, r, H_kv, G, D], k [B, nk, H_kv, D] -> [B, H_kv, G, r, nk]
    s = torch.einsum("bihgd,bjhd->bhgij", q.to(acc), k.to(acc)) * scale
    if offset is not None:
        i = torch.arange(row0, row0 + q.shape[1], device=q.device)[:, None]
        j = torch.arange(k.shape[1], device=q.device)[None, :]
        s = s.masked_fill(j > i + offset, float("-inf"))
    return s


def _safe(lse):
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def torch_forward(q, k, v, scale, offset):
    b, nq, h, d = q.shape
    h_kv = k.shape[2]
    acc = acc_dtype(q.dtype)
    qg = q.reshape(b, nq, h_kv, h // h_kv, d)
    out = torch.empty(b, nq, h_kv, h // h_kv, d, dtype=acc, device=q.device)
    lse = torch.empty(b, h_kv, h // h_kv, nq, dtype=acc, device=q.device)
    vv = v.to(acc)
    for r0, r1 in _row_chunks(q, k.shape[1]):
        s = _scores(qg[:, r0:r1], k, scale, offset, r0, acc)
        l = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - _safe(l)[..., None])
        out[:, r0:r1] = torch.einsum("bhgij,bjhd->bihgd", p, vv)
        lse[..., r0:r1] = l
    return out.reshape(b, nq, h, d), lse.reshape(b, h, nq)


def torch_backward(do, q, k, v, out, lse, scale, offset):
    b, nq, h, d = q.shape
    h_kv = k.shape[2]
    g = h // h_kv
    acc = acc_dtype(q.dtype)
    qg = q.reshape(b, nq, h_kv, g, d)
    dog = do.reshape(b, nq, h_kv, g, d).to(acc)
    # delta = rowsum(dO * O): [B, H_kv, G, nq]
    delta = (dog * out.reshape(b, nq, h_kv, g, d).to(acc)).sum(-1).permute(0, 2, 3, 1)
    lse = _safe(lse.reshape(b, h_kv, g, nq).to(acc))
    kk, vv = k.to(acc), v.to(acc)
    dq = torch.empty(b, nq, h_kv, g, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for r0, r1 in _row_chunks(q, k.shape[1]):
        s = _scores(qg[:, r0:r1], k, scale, offset, r0, acc)
        p = torch.exp(s - lse[..., r0:r1, None])
        dp = torch.einsum("bihgd,bjhd->bhgij", dog[:, r0:r1], vv)
        ds = p * (dp - delta[..., r0:r1, None])
        dq[:, r0:r1] = torch.einsum("bhgij,bjhd->bihgd", ds, kk) * scale
        dk += torch.einsum("bhgij,bihgd->bjhd", ds, qg[:, r0:r1].to(acc)) * scale
        dv += torch.einsum("bhgij,bihgd->bjhd", p, dog[:, r0:r1])
    return dq.reshape(b, nq, h, d), dk, dv


# -- sdpa: PyTorch's fused ops that return the log-sum-exp ------------------------------


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` when its last dim has stride 1, else a contiguous copy: the fused flash ops and
    flash-attn index the head dim as if stride(-1) were 1, whatever the strides say."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _nan_rows_(q, k, out, lse, causal):
    """Make NaN, in place, the rows of a fused piece's `(out, lse)` that see a NaN input
    (the NaN rule in the module docstring): rows of q holding a NaN, and rows that see a
    key holding one (an unmasked piece: every row; a square causal piece: rows from the
    first NaN key on). Returns `(out, lse)`; `out` `[B, n, H, D]`, `lse` `[B, H, n]`."""
    b, n, h, _ = q.shape
    h_kv = k.shape[2]
    bad_k = k.isnan().any(-1)  # [B, nk, H_kv]
    if causal:
        bad_k = bad_k.cumsum(1, dtype=torch.int32) > 0
    else:
        bad_k = bad_k.any(1, keepdim=True)
    bad_k = bad_k[:, :, :, None].expand(-1, -1, -1, h // h_kv).reshape(b, -1, h)
    bad = q.isnan().any(-1) | bad_k  # [B, n, H]
    out.masked_fill_(bad[..., None], float("nan"))
    lse.masked_fill_(bad.transpose(1, 2), float("nan"))
    return out, lse


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


def _cuda_flash_bwd(do, q, k, v, out, lse, scale, causal):
    empty = torch.empty(0, dtype=torch.int64, device=q.device)
    seed = torch.zeros(2, dtype=torch.int64, device=q.device)
    offset = torch.zeros((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse, empty, empty, q.shape[2], k.shape[2], 0.0, causal, seed, offset, scale=scale
    )


def _sdpa_ops(device: torch.device):
    return (_cpu_flash_fwd, _cpu_flash_bwd) if device.type == "cpu" else (_cuda_flash_fwd, _cuda_flash_bwd)


def _sdpa_piece_forward(q, k, v, scale, causal):
    """One unmasked or square-causal piece through the fused op; bshd in and out."""
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


def _sdpa_piece_backward(do, q, k, v, out, lse, scale, causal):
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


def pieces_forward(piece_fwd: Callable, q, k, v, scale, offset):
    """Forward of an offset block through a kernel that knows only unmasked/square causal."""
    b, nq, h, d = q.shape
    pieces = square_pieces(nq, k.shape[1], offset)
    if len(pieces) == 1 and pieces[0][:2] == (0, nq):
        _, _, k0, k1, causal = pieces[0]
        part_out, part_lse = piece_fwd(q, k[:, k0:k1], v[:, k0:k1], scale, causal)
        return _nan_rows_(q, k[:, k0:k1], part_out, part_lse, causal)
    acc = acc_dtype(q.dtype)
    out = torch.zeros(b, nq, h, d, dtype=acc, device=q.device)
    lse = torch.full((b, h, nq), float("-inf"), dtype=acc, device=q.device)
    for q0, q1, k0, k1, causal in pieces:
        part_out, part_lse = piece_fwd(q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], scale, causal)
        _nan_rows_(q[:, q0:q1], k[:, k0:k1], part_out, part_lse, causal)
        merge_(out[:, q0:q1], lse[:, :, q0:q1], part_out, part_lse)
    return out, lse


def pieces_backward(piece_bwd: Callable, do, q, k, v, out, lse, scale, offset):
    nq, nk = q.shape[1], k.shape[1]
    pieces = square_pieces(nq, nk, offset)
    if len(pieces) == 1 and pieces[0][:4] == (0, nq, 0, nk):
        return piece_bwd(do, q, k, v, out, lse, scale, pieces[0][4])
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for q0, q1, k0, k1, causal in pieces:
        dq_p, dk_p, dv_p = piece_bwd(
            do[:, q0:q1], q[:, q0:q1], k[:, k0:k1], v[:, k0:k1], out[:, q0:q1], lse[:, :, q0:q1], scale, causal
        )
        dq[:, q0:q1] += dq_p
        dk[:, k0:k1] += dk_p
        dv[:, k0:k1] += dv_p
    return dq, dk, dv


def sdpa_forward(q, k, v, scale, offset):
    return pieces_forward(_sdpa_piece_forward, q, k, v, scale, offset)


def sdpa_backward(do, q, k, v, out, lse, scale, offset):
    return pieces_backward(_sdpa_piece_backward, do, q, k, v, out, lse, scale, offset)


# -- memory layout --------------------------------------------------------------------

def heads_major(backend: str) -> bool:
    """Whether `backend` runs fastest on `[B, H, n, D]`-contiguous memory (measured: the
    CPU flash op is 5-10% faster on it than on `[B, n, H, D]`), else on `[B, n, H, D]`.
    Triton takes any strides; it is given `[B, n, H, D]` (flash-attn's layout), where a
    tile of rows of one head reads D contiguous elements per row."""
    return backend == "sdpa"


def to_kernel_layout(x: torch.Tensor, backend: str) -> torch.Tensor:
    """`x` `[..., n, H, D]` copied (if needed) into the memory layout `backend` prefers;
    the shape stays `[..., n, H, D]`, only strides change."""
    if heads_major(backend):
        return x.transpose(-3, -2).contiguous().transpose(-3, -2)
    return x.contiguous()


def empty_in_kernel_layout(shape, backend: str, **kwargs):
    """(storage, view): contiguous storage for communication, and its `[..., n, H, D]` view."""
    shape = tuple(shape)
    if heads_major(backend):
        storage = torch.empty(shape[:-3] + (shape[-2], shape[-3], shape[-1]), **kwargs)
        return storage, storage.transpose(-3, -2)
    storage = torch.empty(shape, **kwargs)
    return storage, storage


# -- registry and selection -----------------------------------------------------------

ForwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _flash_attn_fns():
    from . import flash_adapter

    return flash_adapter.forward, flash_adapter.backward


def _triton_fns():
    from .triton import attention as triton_attention

    return triton_attention.forward, triton_attention.backward


_KERNELS: Dict[str, Callable[[], Tuple[ForwardFn, BackwardFn]]] = {
    "torch": lambda: (torch_forward, torch_backward),
    "sdpa": lambda: (sdpa_forward, sdpa_backward),
    "flash_attn": _flash_attn_fns,
    "triton": _triton_fns,
    # the CUDA flash op per block (PyTorch's), merged by seqpar's compiled kernel (_MERGES)
    "cuda": lambda: _cuda_ext().backend_fns()[:2],
}


def _cuda_ext():
    from . import cuda_ext

    return cuda_ext

MergeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def _triton_merge() -> MergeFn:
    from .triton.merge import merge_ as fused_merge

    return fused_merge


# backends whose blocks come with a fused merge of their own (same formula as merge.merge_,
# one pass over the accumulator); every other backend merges with the reference merge_
_MERGES: Dict[str, Callable[[], MergeFn]] = {
    "triton": _triton_merge,
    "cuda": lambda: _cuda_ext().backend_fns()[2],
}


def merge_kernel(backend: str) -> MergeFn:
    """The in-place merge `(out, lse) <- (out, lse) + (part_out, part_lse)` that the
    strategies use for the blocks of `backend` (a concrete backend name)."""
    make = _MERGES.get(backend)
    return merge_ if make is None else make()


def _triton_unavailable(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    try:
        from .triton import attention as triton_attention
    except Exception as exc:  # ImportError, or a triton build that does not load here
        return f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"triton takes float16, bfloat16 or float32, got {dtype} (backend='torch' serves float64)"
    if head_dim > triton_attention.MAX_HEAD_DIM:
        return f"triton takes head_dim <= {triton_attention.MAX_HEAD_DIM}, got {head_dim}"
    if device.type == "cpu":
        if not triton_attention.INTERPRETED:
            return ("triton runs on cpu only in Triton's interpreter (slow; for tests): set TRITON_INTERPRET=1 "
                    "before seqpar's triton kernels are first imported")
        if dtype == torch.bfloat16:
            return "triton on cpu (the interpreter) has no bfloat16, got torch.bfloat16; use float16 or float32"
        return None
    if device.type == "cuda":
        if triton_attention.INTERPRETED:
            return ("seqpar's triton kernels were imported under TRITON_INTERPRET=1 (the cpu interpreter); "
                    "unset it to compile them for cuda")
        if dtype == torch.bfloat16 and torch.cuda.is_available() and torch.cuda.get_device_capability(device) < (8, 0):
            return f"triton needs compute capability >= 8.0 for bfloat16, got {torch.cuda.get_device_capability(device)}"
        return None
    return f"triton serves cuda devices (and cpu under TRITON_INTERPRET=1), got {device.type}"


def cuda_flash_head_dim_reason(head_dim: int) -> Optional[str]:
    """PyTorch's CUDA flash op (called directly, as here, not through F.sdpa, which pads)
    takes head dims that are multiples of 8, up to 256."""
    if head_dim % 8 or head_dim > 256:
        return f"the CUDA flash op needs head_dim a multiple of 8 and <= 256, got {head_dim} (backend='triton' serves it)"
    return None


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                       scale: float = 1.0) -> Optional[str]:
    """Why `backend` cannot serve this case on this machine, or None when it can."""
    if backend == "torch":
        return None
    if scale <= 0 and backend in ("sdpa", "flash_attn"):
        # PyTorch's fused CPU kernel returns NaN for causal blocks with scale <= 0
        return f"{backend} needs softmax_scale > 0, got {scale} (backend='torch' serves it)"
    if backend == "sdpa":
        if device.type == "cpu":
            return None
        if device.type == "cuda":
            if dtype not in (torch.float16, torch.bfloat16):
                return f"sdpa on CUDA needs float16 or bfloat16 (the flash op), got {dtype}"
            return cuda_flash_head_dim_reason(head_dim)
        return f"sdpa supports cpu and cuda devices, got {device.type}"
    if backend == "flash_attn":
        from . import flash_adapter

        return flash_adapter.unavailable_reason(device, dtype, head_dim)
    if backend == "triton":
        return _triton_unavailable(device, dtype, head_dim)
    if backend == "cuda":
        return _cuda_ext().unavailable_reason(device, dtype, head_dim, scale)
    return f"unknown backend {backend!r}"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, scale: float = 1.0) -> str:
    """The concrete backend for `backend`; "auto" takes the first that can serve of:

    - cuda: flash_attn, cuda (PyTorch's flash op + seqpar's compiled merge, when the
      extension is built), sdpa, triton, torch. The compiled kernels come first (their
      speed is known; Triton's has not been measured on a GPU here yet); Triton then serves
      what they cannot: float32, softmax_scale <= 0.
    - other devices: sdpa, torch. Triton on cpu is only its interpreter, never chosen.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = unavailable_reason(backend, device, dtype, head_dim, scale)
        if reason is not None:
            raise ValueError(f"backend: {reason}")
        return backend
    order = ("flash_attn", "cuda", "sdpa", "triton", "torch") if device.type == "cuda" else ("sdpa", "torch")
    for candidate in order:
        if unavailable_reason(candidate, device, dtype, head_dim, scale) is None:
            return candidate
    return "torch"


_verified: set = set()


def _verify_once(name: str, fwd: ForwardFn, bwd: BackwardFn, q: torch.Tensor, k: torch.Tensor) -> None:
    """First use of a backend not exercised by the CPU test suite on a device: compare a
    tiny GQA block (forward and backward, square causal and offset) with the torch math,
    so a changed private kernel API raises instead of returning wrong numbers."""
    key = (name, q.device, q.dtype)
    # on cpu the test suite exercises sdpa and triton (the interpreter) directly
    if key in _verified or (name in ("sdpa", "triton") and q.device.type == "cpu") or name == "torch":
        return
    gen = torch.Generator(device="cpu").manual_seed(0)
    h_kv = 2
    shape_q, shape_k = (1, 37, 2 * h_kv, q.shape[-1]), (1, 37, h_kv, q.shape[-1])
    tq, tk, tv, tdo = (
        torch.randn(s, generator=gen).to(device=q.device, dtype=q.dtype) for s in (shape_q, shape_k, shape_k, shape_q)
    )
    scale = q.shape[-1] ** -0.5
    for offset in (0, 5, None):
        out, lse = fwd(tq, tk, tv, scale, offset)
        ref_out, ref_lse = torch_forward(tq, tk, tv, scale, offset)
        grads = bwd(tdo, tq, tk, tv, ref_out.to(q.dtype), ref_lse, scale, offset)
        ref_grads = torch_backward(tdo, tq, tk, tv, ref_out.to(q.dtype), ref_lse, scale, offset)
        tol = 5e-2 if q.dtype in (torch.float16, torch.bfloat16) else 1e-4
        pairs = [(out, ref_out), (lse, ref_lse)] + list(zip(grads, ref_grads))
        for got, want in pairs:
            if not torch.allclose(got.float(), want.float(), atol=tol, rtol=tol):
                raise RuntimeError(
                    f"backend {name!r} disagrees with the reference math on {q.device} {q.dtype} "
                    f"(offset={offset}); use backend='torch' and report this"
                )
    _verified.add(key)


def kernels(backend: str, q: torch.Tensor, k: torch.Tensor) -> Tuple[ForwardFn, BackwardFn]:
    """(forward, backward) of a concrete backend name, checked once per device and dtype.

    Both are calls of the custom ops `seqpar::block_forward` / `block_backward`
    (`kernels/ops.py`), which run the backend's functions and fix the outputs' dtype and
    layout, so that torch.compile traces each block as one op."""
    fwd, bwd = _KERNELS[backend]()
    _verify_once(backend, fwd, bwd, q, k)
    from . import ops

    return ops.block_fns(backend)
