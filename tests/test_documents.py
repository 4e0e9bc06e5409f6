"""Packed documents in the layout: cu_seqlens checked and agreed, positions inside documents,
per-document zigzag, the balanced scheme's guarantee, and which blocks are visible."""
import random

import pytest
import torch
import torch.distributed as dist

from seqpar.layout import BALANCE_SLACK, SeqLayout, causal_work_of, visible_blocks
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world
from seqpar.testing.checks import visibility


def _layouts(n, p, scheme, docs):
    return [SeqLayout.simulated(n, p, r, scheme, docs) for r in range(p)]


@pytest.mark.parametrize("scheme", ["contiguous", "zigzag", "stripe", "balanced"])
@pytest.mark.parametrize("docs", [(0, 1, 2, 3, 4, 5), (0, 5, 7, 19), (0, 19)])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_every_token_on_exactly_one_rank_and_positions_in_documents(scheme, docs, p):
    n = docs[-1]
    if n < p:
        pytest.skip("fewer tokens than ranks")
    lays = _layouts(n, p, scheme, docs)
    positions = torch.cat([lay.positions() for lay in lays])
    assert sorted(positions.tolist()) == list(range(n))
    starts = torch.tensor(docs[:-1])
    for lay in lays:
        pos = lay.positions()
        doc = torch.searchsorted(starts, pos, right=True) - 1
        assert torch.equal(lay.document_positions(), pos - starts[doc])
        assert torch.equal(lay.cu_seqlens, torch.tensor(docs))
        x = torch.arange(n)[None, :, None]
        assert torch.equal(lay.shard(x)[0, :, 0], pos)


def test_zigzag_cuts_every_document_into_2p_chunks():
    # rank r holds chunks r and 2P-1-r of every document (documents of 8 and 3 tokens, P = 2)
    lays = _layouts(11, 2, "zigzag", (0, 8, 11))
    assert lays[0].positions().tolist() == [0, 1, 6, 7, 8]  # doc 1: [0,1] [6,7]; doc 2: chunk 0 = [8]
    assert lays[1].positions().tolist() == [2, 3, 4, 5, 9, 10]  # doc 2: chunks 1, 2 = [9], [10]
    # one-token documents all go to chunk 0: rank 0 holds them, the others hold nothing
    ones = _layouts(4, 2, "zigzag", (0, 1, 2, 3, 4))
    assert ones[0].local_len == 4 and ones[1].local_len == 0


def _long_tailed(n_docs, seed):
    """Boundaries of `n_docs` documents with Pareto lengths (a few long, many short)."""
    rng = random.Random(seed)
    lengths = [max(1, int(rng.paretovariate(1.1) * 64)) for _ in range(n_docs)]
    return [0] + [sum(lengths[:i + 1]) for i in range(n_docs)]


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("seed", range(6))
def test_balanced_keeps_the_busiest_rank_within_5_percent_of_the_mean(p, seed):
    docs = tuple(_long_tailed(300, seed))
    n = docs[-1]
    spans = list(zip(docs[:-1], docs[1:]))
    lays = _layouts(n, p, "balanced", docs)
    work = [causal_work_of([run for run in _split(lay.runs(), docs)], spans) for lay in lays]
    mean = sum(work) / p
    assert max(work) <= (1 + BALANCE_SLACK) * mean * 1.001, (max(work) / mean)
    # few documents span ranks: only those cut for their size
    owners = {}
    for r, lay in enumerate(lays):
        for pos in lay.positions().tolist():
            owners.setdefault(_doc_of(pos, docs), set()).add(r)
    spanning = sum(len(o) > 1 for o in owners.values())
    assert spanning <= sum(1 for a, b in spans if (b - a) * (b - a + 1) / 2 > BALANCE_SLACK * mean), spanning
    # zigzag with documents is balanced per document, but cuts every one of them
    assert spanning < len(spans) // 4


def _doc_of(pos, docs):
    import bisect

    return bisect.bisect_right(docs, pos) - 1


def _split(runs, docs):
    from seqpar.layout import _document_pieces

    return [run for _, run in _document_pieces(runs, docs)]


def test_balanced_is_deterministic_and_equals_zigzag_without_documents():
    docs = tuple(_long_tailed(50, 1))
    a = [lay.runs() for lay in _layouts(docs[-1], 4, "balanced", docs)]
    b = [lay.runs() for lay in _layouts(docs[-1], 4, "balanced", list(docs))]
    assert a == b
    for r in range(4):
        assert (SeqLayout.simulated(37, 4, r, "balanced").positions().tolist()
                == SeqLayout.simulated(37, 4, r, "zigzag").positions().tolist())


@pytest.mark.parametrize("scheme", ["contiguous", "zigzag", "stripe", "balanced"])
def test_visible_blocks_are_the_document_mask(scheme):
    rng = random.Random(7)
    for _ in range(60):
        p = rng.randint(1, 4)
        n = rng.randint(p, 30)
        docs = tuple([0] + sorted(rng.sample(range(1, n), rng.randint(0, min(6, n - 1)))) + [n])
        causal = rng.random() < 0.6
        mask = visibility(n, causal, docs)
        lays = _layouts(n, p, scheme, docs)
        for qr in range(p):
            for kr in range(p):
                want = mask[lays[qr].positions()][:, lays[kr].positions()]
                got = torch.zeros_like(want, dtype=torch.int)
                for b in visible_blocks(lays[qr], qr, kr, causal):
                    i, j = torch.arange(b.q_len)[:, None], torch.arange(b.k_len)[None, :]
                    vis = torch.ones(b.q_len, b.k_len, dtype=torch.bool) if b.offset is None else j <= i + b.offset
                    assert vis.any()  # no block without a visible pair
                    got[b.q_start:b.q_start + b.q_len, b.k_start:b.k_start + b.k_len] += vis.int()
                assert torch.equal(got, want.int()), (n, p, docs, causal, qr, kr)


BAD_DOCS = [
    ("not_from_zero", [1, 4, 8], "cu_seqlens: expected boundaries starting at 0"),
    ("not_to_seq_len", [0, 4, 7], "cu_seqlens: expected the last boundary to be seq_len=8, got 7"),
    ("not_increasing", [0, 4, 4, 8], r"cu_seqlens: expected strictly increasing boundaries .* got cu_seqlens\[1\]=4 "
                                      r"then cu_seqlens\[2\]=4"),
    ("float_tensor", torch.tensor([0.0, 8.0]), "cu_seqlens: expected a 1-D integer tensor"),
    ("2d", torch.tensor([[0, 8]]), "cu_seqlens: expected a 1-D integer tensor"),
    ("bool_element", [0, True, 8], "cu_seqlens: expected a sequence of ints"),
]


@pytest.mark.parametrize("name, docs, match", BAD_DOCS, ids=[c[0] for c in BAD_DOCS])
def test_bad_cu_seqlens(name, docs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SeqLayout(8, cu_seqlens=docs)


def _documents_differ_by_rank():
    docs = [0, 3, 8] if dist.get_rank() == 0 else [0, 5, 8]
    try:
        SeqLayout(8, scheme="zigzag", cu_seqlens=docs)
    except ValueError as exc:
        return str(exc)
    return "built"


def test_documents_that_differ_between_ranks_raise_everywhere():
    for message in world(2).run(_documents_differ_by_rank, timeout=120):
        assert "cu_seqlens (documents; a checksum of the boundaries) must be the same on every rank" in message


DOC_CASES = [
    # (world, documents, scheme, causal): one-token documents, fewer tokens than ranks in a
    # document, a document across several ranks, every scheme
    (2, (0, 1, 2, 3, 9), "zigzag", True),
    (4, (0, 1, 2, 3, 4, 5), "zigzag", True),
    (3, (0, 2, 16, 17), "balanced", True),
    (4, (0, 30), "balanced", False),
    (3, (0, 5, 6, 20), "stripe", True),
    (2, (0, 7, 8, 15), "contiguous", False),
]


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "usp", "allgather", "token_ring"])
@pytest.mark.parametrize("p, docs, scheme, causal", DOC_CASES)
def test_every_strategy_serves_documents(strategy, p, docs, scheme, causal):
    heads = 12  # divisible by 2, 3 and 4: Ulysses serves every world here
    problem = AttentionProblem(p, docs[-1], heads=heads, kv_heads=p, causal=causal,
                               scheme=scheme, documents=docs)
    assert_matches_dense(problem, world(p).run(check_attention, problem, None, strategy=strategy)[0])


@pytest.mark.parametrize("p, docs", [(4, (0, 1, 2, 3, 4, 5)), (4, tuple(range(0, 31, 3))), (3, (0, 2, 4, 6))])
def test_balanced_never_cuts_documents_shorter_than_2p(p, docs):
    """Short documents stay whole (their zigzag chunks would be partly empty and load the
    low ranks): 10 documents of 3 tokens at P=4 put 2 or 3 on every rank."""
    lays = _layouts(docs[-1], p, "balanced", docs)
    spans = list(zip(docs[:-1], docs[1:]))
    work = [causal_work_of(_split(lay.runs(), docs), spans) for lay in lays]
    largest = max((b - a) * (b - a + 1) // 2 for a, b in spans)
    assert max(work) <= sum(work) / p + largest, work
    for lay in lays:
        for pos in lay.positions().tolist():
            doc = _doc_of(pos, docs)
            assert all(q in lay.positions().tolist() for q in range(docs[doc], docs[doc + 1]))


@pytest.mark.parametrize("scheme", ["zigzag", "balanced"])
def test_usp_serves_a_ulysses_group_that_holds_no_token(scheme):
    # one-token documents at P=4: zigzag leaves ranks (and so a whole Ulysses group of 2) empty
    problem = AttentionProblem(4, 5, heads=4, kv_heads=2, causal=True, scheme=scheme, documents=(0, 1, 2, 3, 4, 5))
    report = world(4).run(check_attention, problem, None, strategy="usp", ulysses_size=2)[0]
    assert_matches_dense(problem, report)


def _star_with_documents():
    import seqpar

    layout = SeqLayout(8, cu_seqlens=[0, 3, 8])
    x = torch.randn(1, layout.local_len, 2, 4)
    try:
        seqpar.star_attention(x, x, x, layout=layout, anchor_len=1)
    except ValueError as exc:
        return str(exc)
    return "returned"


def test_star_refuses_documents_everywhere():
    # before, it ran on across document starts: a silent wrong answer (linear attention
    # serves documents: tests/strategies/test_linear.py)
    for message in world(2).run(_star_with_documents, timeout=120):
        assert "does not take documents" in message, message
