"""All-gather KV sends each peer only the rows of its keys that the peer's queries see, and
returns dK/dV over those rows alone (`common.seen_span`, `common.held_blocks`): adversarial
checks of that narrowing.

- offline, over many geometries: the rows each pair moves are exactly the hull (first to
  last) of the keys dense visibility says the queries see, every rank derives the same rows
  whatever its own rank, the re-based blocks reproduce dense visibility on those rows, and
  `analytic_bytes` equals a volume counted from the dense mask (not from the strategy's
  helpers);
- on real gloo worlds, against float64 dense attention: non-causal windows reaching right,
  documents + windows + `kv_head_chunk` + GQA at P=3 and P=4 with uneven lengths, a value
  head dim of its own, softcap and sinks, layouts where ranks see nothing of some peer or of
  anyone (and ranks that hold no token), world size 1; measured bytes equal the analytic
  ones; and the messages between every ordered pair of ranks are posted in the same order
  and sizes on both ends (what NCCL, which matches by order alone, needs: several chunks'
  gathers and dK/dV returns fly between the same pair).
"""
import random

import pytest
import torch

import seqpar
from seqpar.comm import p2p
from seqpar.layout import SCHEMES, Mask, SeqLayout, visible_blocks
from seqpar.registry import analytic_bytes
from seqpar.strategies.common import held_blocks, seen_span
from seqpar.testing import (
    AttentionProblem,
    assert_matches_dense,
    check_attention,
    world,
)
from seqpar.testing.checks import visibility

ELEMENT = {"float64": 8, "float32": 4, "bfloat16": 2}


# -- dense-mask oracles (independent of the strategy's own helpers) --------------------------

def _dense(seq_len, causal, documents, window):
    mask = visibility(seq_len, causal, documents, window)
    if mask is None:
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool)
        if causal:
            mask = mask.tril()
    return mask


def _hull(seen_cols: torch.Tensor):
    """(first, end) of the True entries of a bool vector, or None."""
    idx = seen_cols.nonzero().flatten()
    return None if len(idx) == 0 else (int(idx.min()), int(idx.max()) + 1)


def _pair_rows(seq_len, world_size, scheme, causal, documents, window):
    """rows[q][k]: the hull of rank k's local key rows that rank q's queries see (dense)."""
    dense = _dense(seq_len, causal, documents, window)
    lay = SeqLayout.simulated(seq_len, world_size, 0, scheme, documents)
    pos = [lay.positions_of(r) for r in range(world_size)]
    return [[_hull(dense[pos[q]][:, pos[k]].any(0)) for k in range(world_size)] for q in range(world_size)]


def _oracle_bytes(rows, rank, batch, kv_heads, head_dim, value_dim, element):
    """What `analytic_bytes` must say, counted from the dense hulls."""
    per_token = batch * kv_heads * (head_dim + value_dim)
    world_size = len(rows)

    def size(span):
        return 0 if span is None else span[1] - span[0]

    sent = sum(size(rows[r][rank]) for r in range(world_size) if r != rank)
    returned = sum(size(rows[rank][s]) for s in range(world_size) if s != rank)
    grads = 8 if element == 8 else 4
    forward = sent * per_token * element
    return {"forward": forward, "backward": forward + returned * per_token * grads}


def _block_mask(blocks, nq, nk):
    m = torch.zeros(nq, nk, dtype=torch.bool)
    for b in blocks:
        assert 0 <= b.k_start and b.k_start + b.k_len <= nk and b.k_len > 0, (b, nk)
        i, j = torch.arange(b.q_len)[:, None], torch.arange(b.k_len)[None, :]
        v = torch.ones(b.q_len, b.k_len, dtype=torch.bool)
        if b.offset is not None:
            v &= j - i <= b.offset
        if b.lo is not None:
            v &= j - i >= b.lo
        sub = m[b.q_start:b.q_start + b.q_len, b.k_start:b.k_start + b.k_len]
        assert not (sub & v).any(), "blocks overlap"
        sub |= v
    return m


def _random_geometries(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        p = rng.choice([1, 2, 3, 4, 5])
        n = rng.randint(p, 48)
        docs = None
        if rng.random() < 0.5 and n > 1:
            cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(1, 6))))
            docs = tuple([0] + cuts + [n])
        causal = rng.random() < 0.5
        window = (rng.choice([-1, 0, 1, 2, 3, 5, 9, 17]), rng.choice([-1, 0, 1, 2, 4, 7, 13]))
        yield p, n, rng.choice(SCHEMES), causal, docs, window


def test_seen_rows_are_the_dense_hull_and_every_rank_derives_them_alike():
    for p, n, scheme, causal, docs, window in _random_geometries(400, seed=7):
        mask = Mask(causal, window)
        dense = _dense(n, causal, docs, window)
        # the layout each rank builds: the rows must not depend on which rank computes them
        lays = [SeqLayout.simulated(n, p, r, scheme, docs) for r in range(p)]
        pos = [lays[0].positions_of(r) for r in range(p)]
        for q in range(p):
            for k in range(p):
                want = dense[pos[q]][:, pos[k]]
                spans = {seen_span(visible_blocks(lay, q, k, mask)) for lay in lays}
                assert len(spans) == 1, (p, n, scheme, causal, docs, window, q, k, spans)
                span = spans.pop()
                assert span == _hull(want.any(0)), (p, n, scheme, causal, docs, window, q, k, span)
                if span is None:
                    continue
                blocks = held_blocks(visible_blocks(lays[q], q, k, mask), span)
                got = _block_mask(blocks, len(pos[q]), span[1] - span[0])
                assert torch.equal(got, want[:, span[0]:span[1]]), (p, n, scheme, causal, docs, window, q, k)


@pytest.mark.parametrize("element, value_dim", [(4, None), (2, 12), (8, 3)])
def test_analytic_bytes_equal_the_volume_counted_from_the_dense_mask(element, value_dim):
    for p, n, scheme, causal, docs, window in _random_geometries(120, seed=element):
        rows = _pair_rows(n, p, scheme, causal, docs, window)
        for rank in range(p):
            lay = SeqLayout.simulated(n, p, rank, scheme, docs)
            got = analytic_bytes("allgather", lay, 2, 6, 3, 8, element, value_dim=value_dim, causal=causal,
                                 window_size=window, kv_head_chunk=2)
            want = _oracle_bytes(rows, rank, 2, 3, 8, 8 if value_dim is None else value_dim, element)
            assert got == want, (p, n, scheme, causal, docs, window, rank)


# -- real worlds --------------------------------------------------------------------------

def _recording_post(log, real):
    def post(sends, recvs, group, op, *args, **kwargs):
        if op.startswith("allgather."):
            # what NCCL matches by: per peer and direction, the order and the sizes
            log.extend(("send", peer, t.numel(), str(t.dtype)) for t, peer in sends if t.numel())
            log.extend(("recv", peer, t.numel(), str(t.dtype)) for t, peer in recvs if t.numel())
        return real(sends, recvs, group, op, *args, **kwargs)
    return post


def _run(problem, chunk):
    """On every rank: the dense check's report, the bytes sent (forward, backward), the
    analytic bytes, the rank's local length and its log of posted messages."""
    log, real = [], p2p.post
    p2p.post = _recording_post(log, real)
    try:
        with seqpar.comm.track() as stats:
            report = check_attention(problem, None, strategy="allgather", kv_head_chunk=chunk)
    finally:
        p2p.post = real
    layout = problem.layout()
    want = analytic_bytes("allgather", layout, problem.batch, problem.heads, problem.kv_heads, problem.head_dim,
                          ELEMENT[problem.dtype], value_dim=problem.value_dim, causal=problem.causal,
                          window_size=problem.window, kv_head_chunk=chunk)
    measured = {"forward": stats.bytes_sent("allgather.forward"),
                "backward": stats.bytes_sent("allgather.backward")}
    return report, measured, want, layout.local_len, log


def _problem(p, n, scheme, causal, window, docs, heads, kv_heads, d, dv, dtype="float64", **extra):
    return AttentionProblem(p, n, batch=2 if p < 4 else 1, heads=heads, kv_heads=kv_heads, head_dim=d,
                            value_dim=dv, causal=causal, scheme=scheme, documents=docs, window=window, dtype=dtype,
                            seed=n * 7 + p, **extra)


CASES = {
    # non-causal windows reaching right (right > 0), GQA, head chunks
    "noncausal-window-zigzag-p3": ((3, 29, "zigzag", False, (3, 5), None, 6, 3, 8, None), 1),
    "right-only-window-stripe-p4": ((4, 37, "stripe", False, (0, 6), None, 4, 2, 8, None), None),
    "unbounded-left-right-3-contiguous-p2": ((2, 17, "contiguous", False, (-1, 3), None, 4, 1, 8, None), None),
    "edge-rows-only-contiguous-p4": ((4, 40, "contiguous", False, (2, 4), None, 4, 2, 8, None), 1),
    "causal-window-right-ignored-p3": ((3, 26, "balanced", True, (4, 3), None, 6, 3, 8, None), 2),
    "two-way-window-pair-p2-three-chunks": ((2, 30, "zigzag", False, (5, 5), None, 6, 3, 8, None), 1),
    # documents + windows + kv_head_chunk + GQA, uneven lengths
    "docs-window-uneven-chunks-balanced-p3": ((3, 31, "balanced", False, (4, 2), (0, 5, 6, 19, 31), 6, 3, 8, None), 2),
    "docs-causal-window-zigzag-p4": ((4, 43, "zigzag", True, (7, -1), (0, 11, 12, 30, 43), 8, 2, 8, None), 1),
    "docs-window-stripe-p4": ((4, 45, "stripe", False, (5, 3), (0, 9, 10, 45), 6, 3, 4, None), 2),
    "docs-window-contiguous-p3": ((3, 34, "contiguous", False, (6, 1), (0, 3, 20, 34), 4, 2, 8, None), 1),
    # a value head dim of its own
    "mla-wider-v-zigzag-p3": ((3, 23, "zigzag", True, (5, 0), None, 6, 3, 8, 12), 1),
    "mla-narrower-v-docs-contiguous-p4": ((4, 26, "contiguous", False, (2, 3), (0, 13, 26), 8, 2, 12, 4), None),
    # ranks that see nothing of some peer, or of anyone; ranks without tokens
    "isolated-last-rank-p3": ((3, 12, "contiguous", True, (-1, -1), (0, 6, 8, 12), 6, 3, 8, None), 1),
    "nobody-talks-empty-rank-p4": ((4, 10, "balanced", False, (-1, -1), (0, 2, 3, 10), 4, 2, 8, None), 1),
    "three-empty-ranks-p4": ((4, 6, "zigzag", True, (-1, -1), (0, 1, 2, 3, 4, 5, 6), 4, 2, 8, None), None),
    "diagonal-window-nobody-talks-p4": ((4, 32, "contiguous", False, (0, 0), None, 4, 2, 8, None), 1),
    "one-way-only-p4": ((4, 40, "contiguous", True, (3, -1), None, 4, 2, 8, None), None),
    # world size 1
    "world-of-one": ((1, 19, "zigzag", False, (3, 2), (0, 7, 19), 6, 3, 8, None), 1),
}

EXTRA = {
    "noncausal-window-zigzag-p3": {"softcap": 5.0, "sinks": True},
    "docs-window-stripe-p4": {"sinks": True},
}

LOW_PRECISION = {
    "bf16-docs-window-mla-balanced-p4": (
        (4, 41, "balanced", False, (6, 2), (0, 17, 18, 41), 8, 2, 12, 8, "bfloat16"), 1),
    "fp32-window-stripe-p3": ((3, 28, "stripe", False, (3, 4), None, 6, 3, 8, None, "float32"), 2),
}


def _check_run(problem, chunk, results):
    assert_matches_dense(problem, results[0][0])
    for rank, (_, measured, want, _, _) in enumerate(results):
        assert measured == want, (rank, measured, want)
    # NCCL matches messages by their order alone: between every ordered pair, the sends
    # one end posts and the receives the other posts must agree one by one, in size
    logs = [log for *_, log in results]
    for s in range(problem.world_size):
        for r in range(problem.world_size):
            sent = [entry[2:] for entry in logs[s] if entry[0] == "send" and entry[1] == r]
            got = [entry[2:] for entry in logs[r] if entry[0] == "recv" and entry[1] == s]
            assert sent == got, (s, r, sent, got)


@pytest.mark.parametrize("name", list(CASES))
def test_allgather_matches_dense_and_moves_the_analytic_bytes(name):
    args, chunk = CASES[name]
    problem = _problem(*args, **EXTRA.get(name, {}))
    _check_run(problem, chunk, world(problem.world_size).run(_run, problem, chunk, timeout=120))


@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_allgather_low_precision(name):
    args, chunk = LOW_PRECISION[name]
    problem = _problem(*args)
    _check_run(problem, chunk, world(problem.world_size).run(_run, problem, chunk, timeout=120))


def test_the_cases_are_as_adversarial_as_named():
    """Guards the cases above against drifting into easy ones (layout changes)."""
    def rows(name):
        (p, n, scheme, causal, window, docs, *_), _ = CASES[name]
        return _pair_rows(n, p, scheme, causal, docs, window), SeqLayout.simulated(n, p, 0, scheme, docs).local_lens

    # a rank that sees nobody and whom nobody sees, beside ranks that talk
    r, lens = rows("isolated-last-rank-p3")
    assert all(r[2][k] is None and r[k][2] is None for k in (0, 1)) and r[1][0] is not None
    # nobody sees another rank; a rank holds no token
    for name in ("nobody-talks-empty-rank-p4", "diagonal-window-nobody-talks-p4"):
        r, lens = rows(name)
        assert all(r[q][k] is None for q in range(4) for k in range(4) if q != k), name
    assert 0 in rows("nobody-talks-empty-rank-p4")[1] and rows("three-empty-ranks-p4")[1].count(0) == 3
    # windows: only a few rows of a neighbour move, some pairs move nothing, one way only
    r, lens = rows("edge-rows-only-contiguous-p4")
    assert r[1][0] == (8, 10) and r[0][1] == (0, 4) and r[0][2] is None and r[3][1] is None
    r, lens = rows("one-way-only-p4")
    assert all(r[q][q + 1] is None for q in range(3)) and all(r[q + 1][q] == (7, 10) for q in range(3))
    # uneven local lengths where promised
    for name in ("docs-window-uneven-chunks-balanced-p3", "docs-causal-window-zigzag-p4", "mla-wider-v-zigzag-p3"):
        assert len(set(rows(name)[1])) > 1, name
    # the narrowing narrows: some pair moves fewer rows than the source holds
    for name in ("noncausal-window-zigzag-p3", "docs-window-contiguous-p3", "docs-window-uneven-chunks-balanced-p3",
                 "two-way-window-pair-p2-three-chunks", "mla-narrower-v-docs-contiguous-p4"):
        r, lens = rows(name)
        assert any(r[q][k] is not None and r[q][k][1] - r[q][k][0] < lens[k]
                   for q in range(len(lens)) for k in range(len(lens)) if q != k), name


def _two_layers(problem, chunk):
    """Two all-gather attentions chained (the first's output is the second's query), the
    backward through both: each call's messages stay its own. Returns the rank's gradients
    gathered to global tensors, and the reference's."""
    from seqpar.kernels.reference import dense_attention
    from seqpar.layout import gather_global

    layout = problem.layout()
    mask = _dense(problem.seq_len, problem.causal, problem.documents, problem.window)
    q, k, v, do = problem.global_tensors()
    leaves = [layout.shard(t).clone().requires_grad_() for t in (q, k, v)]
    kw = {"layout": layout, "causal": problem.causal, "window_size": problem.window, "strategy": "allgather",
          "kv_head_chunk": chunk}
    mid = seqpar.attention(*leaves, **kw)
    out = seqpar.attention(mid * 2.0, leaves[1], leaves[2], **kw)
    out.backward(layout.shard(do))
    ours = [gather_global(t.grad, layout, 1) if layout.world_size > 1 else t.grad for t in leaves]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_mid = dense_attention(*ref_leaves, mask=mask)
    dense_attention(ref_mid * 2.0, ref_leaves[1], ref_leaves[2], mask=mask).backward(do)
    return [(a - t.grad).abs().max().item() / t.grad.abs().max().item() for a, t in zip(ours, ref_leaves)]


def test_two_chained_calls_backward_through_both():
    problem = _problem(3, 27, "zigzag", False, (4, 3), (0, 10, 27), 6, 3, 8, None)
    for errors in world(3).run(_two_layers, problem, 1, timeout=120):
        assert max(errors) < 1e-10, errors
