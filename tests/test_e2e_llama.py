"""End to end: a tiny Llama trained sequence-parallel matches single-process training (float64).

The model below calls an SDPA-compatible function on `[B, H, n, D]` tensors, as models
written against `torch.nn.functional.scaled_dot_product_attention` do. Sequence-parallel
runs swap in seqpar's function (passed in, or patched over `F.scaled_dot_product_attention`),
shard the batch with `seqpar.nn.shard_batch`, take `cross_entropy_share` as the loss and
sum gradients with `all_reduce_gradients`. Losses, every parameter gradient at every step,
and the parameters after the last step must equal single-process training's.
"""
import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import seqpar
from seqpar.testing import FLOAT64_RTOL, world

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, HIDDEN = 64, 32, 2, 4, 2, 64
HEAD_DIM = DIM // HEADS
BATCH, STEPS = 2, 3
# float64 end to end: sequence-parallel and single-process sums differ only in order
# (measured: <= 3e-13 relative); the package's float64 rule
RTOL = FLOAT64_RTOL


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, position_ids, base=10000.0):
    """Rotary embedding of `x` `[B, H, n, D]` at `position_ids` `[B, n]` (global positions)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, dtype=x.dtype) / half)
    angles = (position_ids.to(x.dtype)[..., None] * inv_freq)[:, None]  # [B, 1, n, D/2]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(DIM, HEADS * HEAD_DIM, bias=False)
        self.k_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.v_proj = nn.Linear(DIM, KV_HEADS * HEAD_DIM, bias=False)
        self.o_proj = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)

    def forward(self, x, position_ids, sdpa):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, n, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q, k = rope(q, position_ids), rope(k, position_ids)
        # looked up at call time, so `seqpar.nn.sdpa_patched` reaches it
        attend = F.scaled_dot_product_attention if sdpa is None else sdpa
        out = attend(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, HEADS * HEAD_DIM))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn_norm, self.attn = RMSNorm(DIM), Attention()
        self.mlp_norm = RMSNorm(DIM)
        self.gate = nn.Linear(DIM, HIDDEN, bias=False)
        self.up = nn.Linear(DIM, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, DIM, bias=False)

    def forward(self, x, position_ids, sdpa):
        x = x + self.attn(self.attn_norm(x), position_ids, sdpa)
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, tied: bool, seed: int):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.norm = RMSNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight
        self.double()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():  # norms too, so their gradients are not all alike
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))

    def forward(self, input_ids, position_ids, sdpa=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, position_ids, sdpa)
        return self.lm_head(self.norm(x))


@dataclass(frozen=True)
class Case:
    world_size: int
    seq_len: int
    scheme: str
    strategy: str = "ring"
    tied: bool = False
    swap: str = "argument"  # "argument": the function is passed to the model; "patch": sdpa_patched
    optimizer: str = "adamw"
    seed: int = 0
    documents: Optional[Tuple[int, ...]] = None  # packed documents' boundaries (batch rows share them)


CASES = {
    "p2_contiguous_ring_adamw": Case(2, 23, "contiguous"),
    "p2_zigzag_ring_patched_tied": Case(2, 21, "zigzag", tied=True, swap="patch"),
    "p2_stripe_ulysses": Case(2, 19, "stripe", strategy="ulysses", seed=1),
    "p3_zigzag_ring_sgd": Case(3, 29, "zigzag", optimizer="sgd", seed=2),
    "p3_contiguous_allgather_tied": Case(3, 31, "contiguous", strategy="allgather", tied=True, seed=3),
    # packed documents: positions restart per document, no token sees another document, the
    # last token of a document predicts nothing
    "p2_balanced_documents": Case(2, 27, "balanced", documents=(0, 4, 15, 16, 27), seed=4),
    "p3_zigzag_documents_patched": Case(3, 30, "zigzag", swap="patch", documents=(0, 13, 30), seed=5),
}


def _batches(case):
    """STEPS global batches; about a fifth of the labels are ignore_index, the first too."""
    gen = torch.Generator().manual_seed(100 + case.seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (BATCH, case.seq_len), generator=gen)
        labels = ids.clone()
        labels[torch.rand(ids.shape, generator=gen) < 0.2] = -100
        labels[:, 0] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def _optimizer(case, model):
    if case.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _single_process_documents(case):
    """Per-document positions, an SDPA with the documents' causal mask, labels that end each document."""
    bounds = case.documents
    if bounds is None:
        return torch.arange(case.seq_len), None, []
    doc = torch.zeros(case.seq_len, dtype=torch.long)
    for b in bounds[1:-1]:
        doc[b:] += 1
    positions = torch.arange(case.seq_len) - torch.tensor(bounds)[doc]
    visible = (doc[:, None] == doc[None, :]) & torch.ones(case.seq_len, case.seq_len, dtype=torch.bool).tril()

    def sdpa(q, k, v, is_causal, enable_gqa):
        assert is_causal
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=enable_gqa)

    return positions, sdpa, [b - 1 for b in bounds[1:-1]]


def _train_single_process(case):
    model = TinyLlama(case.tied, case.seed)
    opt = _optimizer(case, model)
    losses, grads = [], []
    positions, sdpa, ends = _single_process_documents(case)
    for batch in _batches(case):
        ids, labels = batch["input_ids"], batch["labels"].clone()
        labels[:, [e + 1 for e in ends]] = -100  # shifted below: a document's last token predicts nothing
        logits = model(ids, positions.expand(BATCH, -1), sdpa)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        losses.append(loss.item())
        grads.append(_grads(model))
        opt.step()
        opt.zero_grad()
    return losses, grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def _train_sequence_parallel(case):
    """On every rank: the same training, sequence-parallel."""
    layout = seqpar.SeqLayout(case.seq_len, scheme=case.scheme, cu_seqlens=case.documents)
    model = TinyLlama(case.tied, case.seed)
    opt = _optimizer(case, model)
    sdpa = functools.partial(seqpar.nn.functional.scaled_dot_product_attention, layout=layout, strategy=case.strategy)
    losses, grads, naive = [], [], None
    for batch in _batches(case):
        local = seqpar.nn.shard_batch(batch, layout)
        if case.swap == "patch":
            with seqpar.nn.sdpa_patched(layout, strategy=case.strategy):
                logits = model(local["input_ids"], local["position_ids"])
        else:
            logits = model(local["input_ids"], local["position_ids"], sdpa)
        if naive is None:
            # the classic bug, as a control: shard first, then shift on the shard
            own = layout.shard(batch["labels"], dim=1)
            naive_share = seqpar.nn.cross_entropy_share(logits[:, :-1].detach(), own[:, 1:])
            naive = seqpar.nn.global_loss(naive_share).item()
        share = seqpar.nn.cross_entropy_share(logits, local["shift_labels"], layout)
        share.backward()
        seqpar.nn.all_reduce_gradients(model.parameters(), layout)
        losses.append(seqpar.nn.global_loss(share, layout).item())
        grads.append(_grads(model))
        opt.step()
        opt.zero_grad()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return losses, grads, params, naive


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_sequence_parallel_training_matches_single_process(name):
    case = CASES[name]
    ref_losses, ref_grads, ref_params = _train_single_process(case)
    results = world(case.world_size).run(_train_sequence_parallel, case)
    for rank, (losses, grads, params, naive) in enumerate(results):
        for step in range(STEPS):
            assert abs(losses[step] - ref_losses[step]) <= RTOL * abs(ref_losses[step]), (rank, step, losses,
                                                                                        ref_losses)
            assert grads[step].keys() == ref_grads[step].keys()
            for pname, want in ref_grads[step].items():
                assert want.abs().max() > 0, pname  # every parameter takes part
                err = _rel(grads[step][pname], want)
                assert err <= RTOL, f"rank {rank} step {step} grad {pname}: rel err {err:.3g}"
        for pname, want in ref_params.items():
            err = _rel(params[pname], want)
            assert err <= RTOL, f"rank {rank} param {pname} after {STEPS} steps: rel err {err:.3g}"
        # the control: local shifting gives a visibly different loss, so the comparison can tell
        assert abs(naive - ref_losses[0]) > 1e-3 * abs(ref_losses[0]), (naive, ref_losses[0])
