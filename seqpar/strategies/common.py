"""What several strategies share: the block loops and the autograd function around them."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from ..kernels.merge import merge_
from ..layout import Block


def fold_sinks(out, lse, sinks):
    """Attention sinks (one logit per query head, a zero value): fold them into a row's
    final `(out [B, n, H, D], lse [B, H, n])` like one more partial result, `(0, sink)`:
    `lse' = logaddexp(lse, sink)`, `out' = out exp(lse - lse')`. With `lse'` and `out'`
    the block backwards stay exact (the flash identity holds with the sink in the
    normaliser). `sinks` `[H]` (None: returns the inputs)."""
    if sinks is None:
        return out, lse
    sink = sinks.detach().to(lse.dtype)[None, :, None]
    new = torch.logaddexp(lse, sink)
    return out * torch.exp(lse - new).transpose(1, 2)[..., None].to(out.dtype), new


def sinks_grad(do, out, lse, sinks):
    """`dL/dsinks` `[H]` from this rank's rows: with `P_sink = exp(sink - lse')`, every
    probability shrinks by `P_j P_sink` as the sink grows, so `dL/dsink = -sum_rows
    P_sink rowsum(dO * O')` (`out`, `lse`: the folded ones)."""
    acc = lse.dtype
    delta = (do.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, n]
    p_sink = torch.exp(sinks.detach().to(acc)[None, :, None] - lse)
    return -(p_sink * delta).sum((0, 2)).to(sinks.dtype)


def saved_output_function(name: str, forward_fn, backward_fn) -> type:
    """An autograd function named `name` (profiles and tracebacks show `{name}Backward`):
    `out, lse = forward_fn(q, k, v, *args)`, attention sinks folded in when given; its
    backward calls `backward_fn(do, q, k, v, out, lse, *args) -> dq, dk, dv` with the saved
    tensors. `.apply(q, k, v, sinks, args)`. Results come back in the input dtypes."""

    def forward(ctx, q, k, v, sinks, args):
        out, lse = fold_sinks(*forward_fn(q, k, v, *args), sinks)
        result = out.to(q.dtype)  # with fp32 inputs the accumulator itself: saved and returned, no copy
        # with sinks the backward's rowsum(dO * O) cancels against dO . v: keep O unrounded
        ctx.save_for_backward(q, k, v, out if sinks is not None else result, lse, sinks)
        ctx.args = args
        return result

    def backward(ctx, do):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        do = do.contiguous()
        dq, dk, dv = backward_fn(do, q, k, v, out, lse, *ctx.args)
        dsinks = sinks_grad(do, out, lse, sinks) if sinks is not None and ctx.needs_input_grad[3] else None
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks, None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


def attend_blocks(fwd, q, k, v, blocks, scale, out, lse, fresh: bool = False, merge=merge_) -> bool:
    """Attend q's rows to k/v over `blocks` and merge each result into `(out, lse)`.

    `fresh`: nothing is written in `(out, lse)` yet; the first block that covers every row
    is then copied instead of merged into zeros (and otherwise they are initialised).
    `merge`: the backend's merge (`block.merge_kernel`), the reference `merge_` by default.
    Returns whether the accumulator is still fresh (no block at all)."""
    for blk in blocks:
        qs = slice(blk.q_start, blk.q_start + blk.q_len)
        ks = slice(blk.k_start, blk.k_start + blk.k_len)
        part_out, part_lse = fwd(q[:, qs], k[:, ks], v[:, ks], scale, blk.offset, blk.lo, blk.softcap)
        if fresh and blk.q_len == q.shape[1]:
            out.copy_(part_out)
            lse.copy_(part_lse)
        else:
            if fresh:
                out.zero_()
                lse.fill_(float("-inf"))
            merge(out[:, qs], lse[:, :, qs], part_out, part_lse)
        fresh = False
    return fresh


def keys_seen(blk: Block) -> Tuple[int, int]:
    """The key rows `(a, b)` of a block that some query of it sees: query i sees keys
    `i + lo .. i + offset` (relative), so over all rows `lo .. q_len - 1 + offset`."""
    first = 0 if blk.lo is None else max(0, blk.lo)
    end = blk.k_len if blk.offset is None else min(blk.k_len, blk.q_len + blk.offset)
    return blk.k_start + first, blk.k_start + max(first, end)


def seen_span(blocks: List[Block]) -> Optional[Tuple[int, int]]:
    """The key rows `(first, end)` that some query of `blocks` sees, from the first such
    row to the last (`keys_seen` over the blocks), or None for no blocks."""
    if not blocks:
        return None
    seen = [keys_seen(blk) for blk in blocks]
    return min(a for a, _ in seen), max(b for _, b in seen)


def held_blocks(blocks: List[Block], rows: Tuple[int, int]) -> List[Block]:
    """`blocks` of a source's keys cut to the rows `(a, b)` held of them and counted from
    `a`. The holder holds every key a block's queries see, so only invisible keys are cut;
    the mask bounds, relative to a block's first key, move with it."""
    a, b = rows
    out = []
    for blk in blocks:
        start, end = max(blk.k_start, a), min(blk.k_start + blk.k_len, b)
        cut = start - blk.k_start
        if start == blk.k_start and end == blk.k_start + blk.k_len:
            out.append(blk if not a else dataclasses.replace(blk, k_start=blk.k_start - a))
            continue
        out.append(dataclasses.replace(
            blk, k_start=start - a, k_len=end - start,
            offset=None if blk.offset is None else blk.offset - cut, lo=None if blk.lo is None else blk.lo - cut))
    return out


# Rows and keys per backward kernel call on CPUs. A call holds its fresh dq, dk, dv and
# about as much kernel workspace until they are added into the accumulators: a 4096 x 4096
# block (N=16384 over P=4, zigzag) held about 40 MiB of such transients; tiles of 1024 hold
# 12 MiB. Ring fwd+bwd at N=16384 (P=2 and 4, 2-core CPU) ran the same with tiles of 1024,
# 2048 and 4096, within 2%. GPU calls stay whole.
BACKWARD_TILE = 1024


def backward_tile_bytes(batch: int, rows: int, heads: int, kv_heads: int, head_dim: int, acc_size: int,
                        keys: int = None, element_size: int = None) -> int:
    """Bytes one CPU backward tile holds while its kernel runs (measured on PyTorch's CPU
    flash op: its fresh dq, dk, dv and about as much workspace again; with fp16/bf16 inputs,
    `element_size` < `acc_size`, half as much again: the op runs on fp32 copies of the
    tile's inputs) for blocks of `rows` queries and `keys` keys (default `rows`) cut to
    `BACKWARD_TILE`. The sdpa backend's CPU tree (`pieces.causal_tree_backward`) holds
    about as much: the tile's gradients and one level's (at most half the rows) or, for a
    tile not a power-of-two multiple of the leaf, its leaves' while they are copied
    (profiled: 2.09x the gradients at 1023 rows, 1.68x at 1024)."""
    t_q, t_k = min(rows, BACKWARD_TILE), min(rows if keys is None else keys, BACKWARD_TILE)
    grads = batch * (t_q * heads + 2 * t_k * kv_heads) * head_dim * acc_size
    low_precision = element_size is not None and element_size < acc_size
    return 2 * grads + (grads // 2 if low_precision else 0)


def backward_tiles(blk: Block, tile: int) -> List[Block]:
    """`blk` cut into sub-blocks of at most `tile` rows and keys with the same mask (sub-blocks
    that see no key dropped; bounds that no pair of a sub-block reaches dropped too)."""
    if blk.q_len <= tile and blk.k_len <= tile:
        return [blk]
    tiles = []
    for r0 in range(0, blk.q_len, tile):
        rows = min(tile, blk.q_len - r0)
        for c0 in range(0, blk.k_len, tile):
            keys = min(tile, blk.k_len - c0)
            shift = r0 - c0  # j - i within the sub-block = (j - i within the block) - shift
            offset = None if blk.offset is None else blk.offset + shift
            lo = None if blk.lo is None else blk.lo + shift
            # j - i spans [-(rows - 1), keys - 1] in the sub-block
            if (offset is not None and offset < -(rows - 1)) or (lo is not None and lo > keys - 1):
                continue
            offset = None if offset is not None and offset >= keys - 1 else offset
            lo = None if lo is not None and lo <= -(rows - 1) else lo
            tiles.append(dataclasses.replace(blk, q_start=blk.q_start + r0, q_len=rows, k_start=blk.k_start + c0,
                                             k_len=keys, offset=offset, lo=lo))
    return tiles


def attend_blocks_backward(bwd, blocks, do, q, k, v, out, lse, scale, dq, dk, dv, ready=None) -> None:
    """Backward of `attend_blocks`: add each block's gradients into dq (rows) and dk, dv (keys)
    (on CPUs in tiles of `BACKWARD_TILE` rows and keys).

    `ready`: if given, dk and dv are not known yet; `ready()` is called once, after the first
    block's (tile's) kernel and before anything is added into them, and returns `(dk, dv)`.
    The ring waits there for the partial dK/dV arriving from its neighbour and adds into it,
    so the first tile's kernel overlaps the transfer and no step-sized buffer of fresh
    gradients is held beside the arriving one."""
    if q.device.type == "cpu":
        blocks = [tile for blk in blocks for tile in backward_tiles(blk, BACKWARD_TILE)]
    for blk in blocks:
        qs = slice(blk.q_start, blk.q_start + blk.q_len)
        ks = slice(blk.k_start, blk.k_start + blk.k_len)
        dq_b, dk_b, dv_b = bwd(do[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs], scale, blk.offset,
                               blk.lo, blk.softcap)
        dq[:, qs] += dq_b
        if ready is not None:
            dk, dv = ready()
            ready = None
        dk[:, ks] += dk_b
        dv[:, ks] += dv_b
        del dq_b, dk_b, dv_b  # the next tile's kernel allocates its own
