"""Star attention for generation: a per-rank KV cache and a greedy decoding loop.

Use the cache inside your own model's attention layers:

    cache = seqpar.StarKVCache(group=layout.group)
    # phase 1: each rank runs its contiguous block of the prompt (layout.shard(prompt));
    # in attention layer `i`:
    out = cache.prefill(i, q, k, v, layout=layout, anchor_len=a)
    # phase 2: every rank runs the same new token(s); in attention layer `i`:
    out = cache.decode(i, q, k, v)

or hand `star_generate` a model written as `forward(input_ids, positions, attend) -> logits`
whose attention layers call `attend(layer, q, k, v)`; it runs both phases and greedy
decoding. Inference only: the cache keeps detached tensors.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .comm import collectives
from .call import collective_call
from .comm.groups import describe
from .layout import SeqLayout, group_rank_and_size
from .strategies.star import _query_call, star_attention
from .errors import brief


class _LayerKV:
    """One layer's K/V on this rank: `[B, capacity, H_kv, D]` buffers, the first `length`
    rows valid, and every rank's length (`lens`, the same list on every rank)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lens: List[int], room: int):
        b, n, h_kv, d = k.shape
        self.k = k.new_empty((b, n + room, h_kv, d))
        self.v = v.new_empty((b, n + room, h_kv, d))
        self.k[:, :n] = k.detach()
        self.v[:, :n] = v.detach()
        self.length = n
        self.lens = list(lens)

    def check(self, k, v, new_tokens: Optional[int] = None) -> None:
        """New tokens' k, v must match the cached batch, KV heads, head dim, dtype, device,
        and hold `new_tokens` tokens (those of q) when given."""
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            want = (self.k.shape[0], self.k.shape[2], self.k.shape[3])
            if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != want:
                raise ValueError(
                    f"{name}: expected [batch, n, kv_heads, head_dim] with (batch, kv_heads, head_dim) = {want} "
                    f"(those of the cache), got shape {tuple(t.shape)}"
                )
            if t.dtype != self.k.dtype or t.device != self.k.device:
                raise ValueError(
                    f"{name}: expected {self.k.dtype} on {self.k.device} (the cache's), got {t.dtype} on {t.device}"
                )
            if new_tokens is not None and t.shape[1] != new_tokens:
                raise ValueError(f"{name}: expected {new_tokens} new tokens (dim 1, those of q), got {t.shape[1]}")

    def staged(self, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None):
        """Views of the valid rows plus `k`, `v` written after them (not yet committed)."""
        end = self.length
        if k is not None:
            end += k.shape[1]
            if end > self.k.shape[1]:
                # grow by half (amortised O(1) copies per token, at most 50% spare rows)
                capacity = max(end, self.k.shape[1] * 3 // 2)
                for name in ("k", "v"):
                    old = getattr(self, name)
                    new = old.new_empty((old.shape[0], capacity) + tuple(old.shape[2:]))
                    new[:, :self.length] = old[:, :self.length]
                    setattr(self, name, new)
            self.k[:, self.length:end] = k
            self.v[:, self.length:end] = v
        return self.k[:, :end], self.v[:, :end]


class StarKVCache:
    """This rank's K/V for Star attention, by layer.

    Rank r keeps the K/V of its own contiguous block of the context (filled by phase 1,
    `prefill`); the tokens of phase 2 (`decode`) are appended on the last rank of the group
    (the paper's query host), so the global KV stays in rank order. Every rank knows every
    rank's length without communicating and hands them to `star_query_attention`, which
    then skips its length gather. `decode_room`: spare rows reserved on the last rank per
    layer for decoded tokens (the buffer grows by half when they run out).
    """

    def __init__(self, *, group=None, decode_room: int = 256):
        if isinstance(decode_room, bool) or not isinstance(decode_room, int) or decode_room < 0:
            raise ValueError(f"decode_room: expected a non-negative int, got {brief(decode_room)}")
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.decode_room = decode_room
        self._layers: Dict[int, _LayerKV] = {}

    def prefill(self, layer: int, q, k, v, *, layout: SeqLayout, anchor_len: int, softmax_scale=None,
                backend="auto"):
        """Phase 1 for `layer`: `star_attention(q, k, v, layout=layout, anchor_len=anchor_len)`,
        keeping this rank's k, v. `q` `[B, n_r, H, D]`, `k`/`v` `[B, n_r, H_kv, D]`: this
        rank's block of `layout` (contiguous, on the cache's group). Returns `[B, n_r, H, D]`."""
        if not isinstance(layout, SeqLayout) or layout.group is not self.group:
            raise ValueError(f"layout: expected a seqpar.SeqLayout on the cache's group, got {brief(layout)}")
        if layer in self._layers:
            raise ValueError(f"layer: layer {layer!r} is already filled; use a new StarKVCache per sequence")
        out = star_attention(q, k, v, layout=layout, anchor_len=anchor_len, softmax_scale=softmax_scale,
                             backend=backend)
        room = self.decode_room if self.rank == self.world_size - 1 else 0
        self._layers[layer] = _LayerKV(k, v, layout.local_lens, room)
        return out

    def decode(self, layer: int, q, k, v, *, softmax_scale=None, backend="auto"):
        """Phase 2 for `layer`: `q` `[B, n, H, D]`, `k`/`v` `[B, n, H_kv, D]` of the n new
        tokens, the same on every rank. The last rank appends k, v; every rank then attends
        q causally to the whole cache (the new tokens are its last n positions) and gets
        the same `[B, n, H, D]`. A bad k or v raises on every rank and appends nothing."""
        entry = self._entry(layer)
        error = None
        n = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
        try:
            entry.check(k, v, new_tokens=n if isinstance(q, torch.Tensor) and q.dim() == 4 else None)
        except (TypeError, ValueError) as exc:
            error = exc
        last = self.rank == self.world_size - 1
        if error is None and last:
            cached_k, cached_v = entry.staged(k, v)
        else:
            cached_k, cached_v = entry.staged()
        lens = entry.lens[:-1] + [entry.lens[-1] + n]
        out = _query_call(q, cached_k, cached_v, group=self.group, causal=True, softmax_scale=softmax_scale,
                          backend=backend, kv_lens=lens, prior_error=error,
                          prior_signature=(("layer", describe(layer)), ("new k", describe(k)), ("new v", describe(v))))
        # commit only after every rank agreed: a failed call leaves the cache as it was
        if last:
            entry.length += n
        entry.lens = lens
        return out

    def _entry(self, layer) -> "_LayerKV":
        entry = self._layers.get(layer)
        if entry is None:
            raise ValueError(f"layer: no K/V for layer {layer!r}; run prefill first (filled: {sorted(self._layers)})")
        return entry

    def kv(self, layer: int):
        """This rank's cached `(k, v)` of `layer`, each `[B, m_r, H_kv, D]` (views)."""
        return self._entry(layer).staged()

    def kv_lens(self, layer: int) -> List[int]:
        """Every rank's cached length for `layer`, in rank order."""
        return list(self._entry(layer).lens)


def star_generate(forward: Callable, input_ids: torch.Tensor, *, layout: SeqLayout, anchor_len: int,
                  max_new_tokens: int, softmax_scale=None, backend="auto", return_logits: bool = False):
    """Greedy decoding with Star attention.

    `forward(input_ids [B, n], positions LongTensor[n], attend) -> logits [B, n, V]` is the
    model; its attention layers call `attend(layer, q, k, v)` (q `[B, n, H, D]` after
    RoPE, k/v `[B, n, H_kv, D]`) and use the `[B, n, H, D]` result as their attention
    output. `input_ids` `[B, n_r]` (int64): this rank's block of the prompt under
    `layout` (contiguous), e.g. `layout.shard(prompt)`.

    Phase 1 encodes the prompt with `star_attention(anchor_len=anchor_len)`; the last
    rank's last logits choose the first token. Each later token runs through `forward`
    on every rank (phase 2, exact over the cache). The last rank's choice is broadcast
    each step (B int64), so a rounding difference between ranks can never fork the
    sequences. Returns the `[B, max_new_tokens]` int64 tokens on every rank; with
    `return_logits`, also the fp32 logits that chose them, `[B, max_new_tokens, V]`.
    """
    group = layout.group if isinstance(layout, SeqLayout) else None
    rank, world = group_rank_and_size(group)
    error = None
    try:
        if not isinstance(layout, SeqLayout):
            raise TypeError(f"layout: expected a seqpar.SeqLayout, got {type(layout).__name__}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids: expected an int64 tensor [batch, local_len], got {describe(input_ids)}")
        if input_ids.shape[1] != layout.local_len:
            raise ValueError(
                f"input_ids: expected {layout.local_len} tokens (layout.local_len on rank {rank}), "
                f"got {input_ids.shape[1]}"
            )
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected a positive int, got {brief(max_new_tokens)}")
    except (TypeError, ValueError) as exc:
        error = exc
    batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2 else None
    signature = (("input_ids batch", batch), ("max_new_tokens", describe(max_new_tokens)),
                 ("return_logits", describe(return_logits)))
    collective_call(group, "seqpar.star_generate", lambda: None, signature, prior_error=error)

    cache = StarKVCache(group=group, decode_room=max_new_tokens)
    device = input_ids.device

    def prefill(layer, q, k, v):
        return cache.prefill(layer, q, k, v, layout=layout, anchor_len=anchor_len, softmax_scale=softmax_scale,
                             backend=backend)

    def decode(layer, q, k, v):
        return cache.decode(layer, q, k, v, softmax_scale=softmax_scale, backend=backend)

    def choose(logits: torch.Tensor, share_logits: bool):
        """The last rank's greedy token (and, if asked, its logits) on every rank."""
        logits = logits.float().contiguous()
        token = logits.argmax(-1)
        collectives.broadcast(token, world - 1, group, op="star.generate.token")
        if share_logits:
            collectives.broadcast(logits, world - 1, group, op="star.generate.logits")
        return token, logits

    tokens, chosen_logits = [], []
    with torch.no_grad():
        logits = forward(input_ids, layout.positions(device=device), prefill)
        token, step_logits = choose(logits[:, -1], return_logits)
        for step in range(max_new_tokens):
            tokens.append(token)
            chosen_logits.append(step_logits)
            if step == max_new_tokens - 1:
                break
            position = torch.tensor([layout.seq_len + step], device=device)
            logits = forward(token[:, None], position, decode)
            token, step_logits = choose(logits[:, -1], False)
    out = torch.stack(tokens, dim=1)
    return (out, torch.stack(chosen_logits, dim=1)) if return_logits else out
