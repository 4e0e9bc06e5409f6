"""Training on sequence shards: shard a batch, the global token-mean loss, gradient all-reduce.

The convention (the data-parallel one, with sums):

    batch = shard_batch(global_batch, layout)          # shift labels globally, then shard
    logits = model(batch["input_ids"], position_ids=batch["position_ids"])
    loss = cross_entropy_share(logits, batch["shift_labels"], layout)
    loss.backward()                                     # collective: attention's backward talks
    all_reduce_gradients(model.parameters(), layout)    # SUM over the layout's group
    optimizer.step()
    print(global_loss(loss, layout))                    # the global mean, for logging

- `loss` on rank r is its *share* `sum of rank r's token losses / global token count`; the
  shares add up to the global token mean that single-process training computes. The count
  is an integer all-reduced in the forward; it carries no gradient, so no collective sits in
  the loss's autograd graph.
- Every rank backprops its own share. Sequence-parallel attention's backward already sums
  every rank's contribution into each rank's q/k/v gradients, so after the backward the
  gradients of rank r's parameter replica hold rank r's part of the true gradient; their
  **sum** over the group is single-process training's gradient. `all_reduce_gradients`
  sums them. DDP and FSDP *average* over their group instead: if the sequence-parallel
  ranks are part of that group, multiply the loss by `layout.world_size` before `backward`
  (each data-parallel replica then contributes the gradient of its global token mean, and
  their average is what DDP computes).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..comm import collectives
from ..call import collective_call
from ..comm.groups import describe
from ..layout import SeqLayout, group_rank_and_size

IGNORE_INDEX = -100
# keys that name per-token tensors: they must have the sequence length (anything else is an error)
SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "inputs_embeds", "token_type_ids")


def _group_of(layout) -> Any:
    if layout is None:
        return None
    if not isinstance(layout, SeqLayout):
        raise TypeError(f"layout: expected a seqpar.SeqLayout or None, got {type(layout).__name__}")
    return layout.group


# keys of a batch that give document boundaries `[0, l1, ..., N]` (DataCollatorWithFlattening's
# return_flash_attn_kwargs=True gives the first two; flash-attn varlen calls them cu_seqlens)
DOCUMENT_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "cu_seqlens")


def _bounds(value, name: str) -> Tuple[int, ...]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise ValueError(f"{name}: expected a 1-D integer tensor of document boundaries [0, l1, ..., seq_len], "
                             f"got {value.dim()}-D {value.dtype}")
        return tuple(int(x) for x in value.tolist())
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return tuple(value)
    raise TypeError(f"{name}: expected a 1-D integer tensor or a list of ints, got {type(value).__name__}")


def _show(bounds: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(b) for b in bounds[:limit])
    return f"[{shown}{', ...' if len(bounds) > limit else ''}] ({len(bounds) - 1} documents)"


def restarts_of(position_ids: torch.Tensor) -> Tuple[int, ...]:
    """Document boundaries `[0, ..., N]` of one row of position ids: a document starts
    where a position is not its predecessor's plus one (transformers' packed-sequence rule)."""
    row = position_ids.reshape(-1)
    starts = ((row[1:] - row[:-1]) != 1).nonzero().reshape(-1) + 1
    return (0,) + tuple(int(i) for i in starts.tolist()) + (row.numel(),)


def cu_seqlens_of(batch: Mapping[str, Any]) -> Optional[List[int]]:
    """The document boundaries `[0, l1, l1+l2, ..., N]` of a global packed batch, for
    `SeqLayout(N, cu_seqlens=...)`; None when the batch is one document per row.

    Read from `cu_seq_lens_q`/`cu_seq_lens_k`/`cu_seqlens` (DataCollatorWithFlattening
    with `return_flash_attn_kwargs=True`, flash-attn varlen) or from `position_ids` that
    restart (a document starts where a position is not the previous one plus one); when
    both are there they must agree. Every row of `position_ids` must restart at the same
    places (pack into batch 1 for different packings). Local (no communication)."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a mapping of names to tensors, got {type(batch).__name__}")
    found = []  # (name, bounds)
    for key in DOCUMENT_KEYS:
        if batch.get(key) is not None:
            found.append((f"batch[{key!r}]", _bounds(batch[key], f"batch[{key!r}]")))
    positions = batch.get("position_ids")
    if isinstance(positions, torch.Tensor) and positions.numel():
        rows = positions.reshape(-1, positions.shape[-1])
        first = restarts_of(rows[0])
        for i in range(1, rows.shape[0]):
            other = restarts_of(rows[i])
            if other != first:
                raise ValueError(
                    f"batch['position_ids']: expected every row to restart at the same places (seqpar packs the "
                    f"same documents in every row; pack into batch 1 for different packings), got row 0 with "
                    f"boundaries {_show(first)} and row {i} with {_show(other)}")
        found.append(("batch['position_ids'] (where positions restart)", first))
    if not found:
        return None
    name, bounds = found[0]
    for other_name, other in found[1:]:
        if other != bounds:
            raise ValueError(f"{other_name}: expected the documents of {name}, {_show(bounds)}, got {_show(other)}")
    return None if len(bounds) == 2 else list(bounds)


def shard_batch(batch: Mapping[str, Any], layout: SeqLayout, *, shift_labels: bool = True,
                ignore_index: int = IGNORE_INDEX) -> Dict[str, Any]:
    """This rank's part of a global batch of `[B, N, ...]` tensors (N = `layout.seq_len`).

    - `labels` `[B, N]` with `shift_labels=True` (default) are shifted for next-token
      prediction on the *global* sequence first (label of token i = `labels[:, i + 1]`, the
      last token gets `ignore_index`), then sharded, and returned as `shift_labels` (the
      name transformers' causal-LM loss uses for labels already shifted). `labels` is then
      absent, so no model shifts them a second time on the local shard. Shifting the local
      shard instead would pair the last token of each shard with nothing and lose one
      target per shard boundary. With documents, the last token of every document gets
      `ignore_index` too: it must not predict the next document's first token.
      `shift_labels=False`: `labels` are sharded as they are.
    - Documents (packed sequences) are the layout's (`SeqLayout(N, cu_seqlens=...)`, any
      scheme, "balanced" included). A batch that names documents itself (`cu_seq_lens_q`,
      `cu_seq_lens_k`, `cu_seqlens`, or `position_ids` that restart; `cu_seqlens_of(batch)`
      reads them) must name the layout's: a ValueError says which differ otherwise.
      Those boundary tensors pass through unchanged (global), for the model's attention.
    - `position_ids`: sharded if present, else `layout.document_positions()` expanded to
      `[B, n_local]`: each token's position inside its document (the global position
      without documents), which RoPE needs.
    - Every other tensor whose dim 1 has N entries is sharded with `layout.shard(x, dim=1)`;
      other values pass through unchanged. The keys in `SEQUENCE_KEYS` (input_ids,
      attention_mask, ...) must have N entries in dim 1.

    Local (no communication): every rank passes the same global batch and keeps its part.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected a mapping of names to tensors, got {type(batch).__name__}")
    if not isinstance(layout, SeqLayout):
        raise TypeError(f"layout: expected a seqpar.SeqLayout, got {type(layout).__name__}")
    if not isinstance(shift_labels, bool):
        raise TypeError(f"shift_labels: expected a bool, got {type(shift_labels).__name__}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
    n = layout.seq_len
    for key in SEQUENCE_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"batch[{key!r}]: expected a torch.Tensor, got {type(value).__name__}")
        if key == "position_ids" and value.dim() == 1:
            if value.shape[0] != n:
                raise ValueError(f"batch['position_ids']: expected shape [{n}] or [B, {n}], got {tuple(value.shape)}")
        elif value.dim() < 2 or value.shape[1] != n:
            raise ValueError(
                f"batch[{key!r}]: expected shape [B, {n}, ...] (dim 1 = layout.seq_len), got {tuple(value.shape)}"
            )
    layout_documents = layout.documents if layout.documents is not None else (0, n)
    given = cu_seqlens_of(batch)
    given = (0, n) if given is None else tuple(given)
    named = any(batch.get(k) is not None for k in DOCUMENT_KEYS + ("position_ids",))
    if named and given != layout_documents:
        source = next(k for k in DOCUMENT_KEYS + ("position_ids",) if batch.get(k) is not None)
        raise ValueError(
            f"batch[{source!r}]: expected the layout's documents {_show(layout_documents)}, got {_show(given)} "
            f"(build the layout from the batch: SeqLayout({n}, scheme=..., cu_seqlens=seqpar.nn.cu_seqlens_of(batch)))")
    out: Dict[str, Any] = {}
    for key, value in batch.items():
        if key == "labels" and shift_labels and value is not None:
            shifted = torch.full_like(value, ignore_index)
            shifted[:, :-1] = value[:, 1:]
            # the last token of a document does not predict the first of the next
            ends = torch.tensor(layout_documents[1:-1], dtype=torch.long, device=value.device) - 1
            shifted[:, ends] = ignore_index
            out["shift_labels"] = layout.shard(shifted, dim=1)
        elif key == "position_ids" and value is not None and value.dim() == 1:
            out[key] = layout.shard(value, dim=0)
        elif isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == n:
            out[key] = layout.shard(value, dim=1)
        else:
            out[key] = value
    if out.get("position_ids") is None:
        like = next((batch[k] for k in ("input_ids", "inputs_embeds") if isinstance(batch.get(k), torch.Tensor)), None)
        if like is None:
            like = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == n),
                        None)
        positions = layout.document_positions(device=None if like is None else like.device)
        out["position_ids"] = positions.unsqueeze(0).expand(1 if like is None else like.shape[0], -1)
    return out


def cross_entropy_share(logits: torch.Tensor, labels: torch.Tensor, layout: Optional[SeqLayout] = None, *,
                        ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """This rank's share of the global token-mean cross-entropy; differentiable.

    `logits` `[B, n_local, V]`, `labels` `[B, n_local]` (already shifted: `shard_batch`'s
    `shift_labels`). Returns `sum of this rank's token losses / number of tokens on all
    ranks whose label is not ignore_index`, computed in fp32 or better. The shares of all
    ranks add up to the mean that `F.cross_entropy(..., ignore_index=ignore_index)` gives on
    the global sequence (NaN, like torch's, when no token counts). Collective over the
    layout's group (one all-reduce of the count); bad input on one rank raises on every rank.
    """
    group = None
    error = None
    try:
        group = _group_of(layout)
        if not isinstance(logits, torch.Tensor):
            raise TypeError(f"logits: expected a torch.Tensor, got {type(logits).__name__}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels: expected a torch.Tensor, got {type(labels).__name__}")
        if logits.dim() != 3 or not logits.is_floating_point():
            raise ValueError(f"logits: expected a float tensor [B, n_local, vocab], "
                             f"got {logits.dtype} shape {tuple(logits.shape)}")
        if labels.shape != logits.shape[:2]:
            raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])} (that of logits without vocab), "
                             f"got {tuple(labels.shape)}")
        if labels.dtype != torch.long:
            raise ValueError(f"labels: expected dtype torch.int64, got {labels.dtype}")
        if layout is not None and logits.shape[1] != layout.local_len:
            raise ValueError(
                f"logits: expected dim 1 of size {layout.local_len} (layout.local_len on rank {layout.rank}), "
                f"got {logits.shape[1]}"
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")
        # cross_entropy would raise an IndexError on this rank alone, after its peers have
        # entered the count's all-reduce: check the labels here, before the agreement
        vocab_size = logits.shape[-1]
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(bad.any()):
            raise ValueError(f"labels: expected class indices in [0, {vocab_size}) or ignore_index={ignore_index}, "
                             f"got {labels[bad][0].item()}")
    except (TypeError, ValueError) as exc:
        error = exc
    _, world = group_rank_and_size(group)
    vocab = describe(logits)[1][-1:] if error is None else None
    signature = (
        ("logits [vocab], dtype, device", (vocab,) + describe(logits)[2:]),
        ("labels dtype", describe(labels)[2:]),
        ("ignore_index", describe(ignore_index)),
    )
    collective_call(group, "seqpar.nn.cross_entropy_share", lambda: None, signature, prior_error=error)
    acc = torch.promote_types(logits.dtype, torch.float32)
    local_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(acc), labels.reshape(-1),
                                ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().reshape(1)
    if world > 1:
        count = count.to(collectives.device_of(group))
        collectives.all_reduce_sum(count, group, op="nn.loss_count")
    return local_sum / count[0].to(device=local_sum.device, dtype=acc)


def global_loss(share: torch.Tensor, layout: Optional[SeqLayout] = None) -> torch.Tensor:
    """The sum of every rank's `share` (no gradient): the global loss, for logging.

    Collective over the layout's group; bad input on one rank raises on every rank.
    """
    group = None
    error = None
    try:
        group = _group_of(layout)
        if not isinstance(share, torch.Tensor) or share.numel() != 1:
            given = f"shape {tuple(share.shape)}" if isinstance(share, torch.Tensor) else type(share).__name__
            raise ValueError(f"share: expected a one-element tensor (cross_entropy_share's result), got {given}")
    except (TypeError, ValueError) as exc:
        error = exc
    _, world = group_rank_and_size(group)
    collective_call(group, "seqpar.nn.global_loss", lambda: None, (("share", describe(share)),), prior_error=error)
    total = share.detach().reshape(1).to(torch.float64).clone()
    if world > 1:
        total = total.to(collectives.device_of(group))
        collectives.all_reduce_sum(total, group, op="nn.global_loss")
    return total[0].to(device=share.device, dtype=share.dtype)


def all_reduce_gradients(parameters: Iterable[torch.Tensor], layout: Optional[SeqLayout] = None, *,
                         bucket_elements: int = 1 << 24) -> None:
    """Sum the gradients of `parameters` over the layout's group, in place.

    After every rank's `backward` of its `cross_entropy_share`, this turns each rank's
    gradients into single-process training's gradient (see the module docstring). A
    parameter whose gradient is None on some ranks but not others gets zeros there first
    (its true gradient is the sum); one whose gradient is None everywhere stays None.
    Gradients are summed in buckets of at most `bucket_elements` elements per dtype and
    device. Collective; every rank passes the same parameters (shapes and dtypes are
    checked: a mismatch raises on every rank).
    """
    params = []
    group = None
    error = None
    try:
        group = _group_of(layout)
        if isinstance(parameters, torch.Tensor):
            raise TypeError("parameters: expected an iterable of tensors (e.g. model.parameters()), "
                            "got a single tensor")
        params = list(parameters)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"parameters[{i}]: expected a torch.Tensor, got {type(p).__name__}")
            if p.grad is not None and (p.grad.is_sparse or p.grad.shape != p.shape):
                raise ValueError(f"parameters[{i}]: expected a dense gradient of shape {tuple(p.shape)}, "
                                 f"got {p.grad.layout} shape {tuple(p.grad.shape)}")
        if isinstance(bucket_elements, bool) or not isinstance(bucket_elements, int) or bucket_elements < 1:
            raise ValueError(f"bucket_elements: expected a positive int, got {bucket_elements!r}")
    except (TypeError, ValueError) as exc:
        error = exc
    _, world = group_rank_and_size(group)
    signature = (("parameters [shape, dtype, device]", tuple(describe(p) for p in params)),
                 ("bucket_elements", describe(bucket_elements)))
    collective_call(group, "seqpar.nn.all_reduce_gradients", lambda: None, signature, prior_error=error)
    if world == 1 or not params:
        return
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                            device=collectives.device_of(group))
    collectives.all_reduce_max(has_grad, group, op="nn.gradients.present")
    buckets: Dict[tuple, list] = {}
    for p, present in zip(params, has_grad.tolist()):
        if not present:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        start = 0
        while start < len(grads):
            # [start, stop): consecutive gradients adding up to at most bucket_elements (at least one)
            stop, size = start + 1, grads[start].numel()
            while stop < len(grads) and size + grads[stop].numel() <= bucket_elements:
                size += grads[stop].numel()
                stop += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:stop]])
            collectives.all_reduce_sum(flat, group, op="nn.gradients")
            offset = 0
            for g in grads[start:stop]:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            start = stop
