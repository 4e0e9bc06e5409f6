"""Measured bytes equal `analytic_bytes` for masked problems (windows, documents, both) on
every softmax strategy."""
import pytest
import torch

import seqpar
from seqpar.layout import SeqLayout
from seqpar.registry import analytic_bytes
from seqpar.testing import world

STRATEGIES = ["ring", "ulysses", "usp", "allgather", "token_ring"]


def _measure(strategy, seq_len, scheme, window, documents):
    layout = SeqLayout(seq_len, scheme=scheme, cu_seqlens=documents)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, layout.local_len, 12, 8, generator=gen).requires_grad_()
    k, v = (torch.randn(1, layout.local_len, 12, 8, generator=gen).requires_grad_() for _ in range(2))
    with seqpar.comm.track() as fwd:
        out = seqpar.attention(q, k, v, layout=layout, causal=True, window_size=window, strategy=strategy)
    with seqpar.comm.track() as bwd:
        out.sum().backward()
    want = analytic_bytes(strategy, layout, 1, 12, 12, 8, 4, causal=True, window_size=window)
    return (fwd.bytes_sent(strategy), bwd.bytes_sent(strategy)), (want["forward"], want["backward"])


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("p, n, scheme, window, documents", [
    (4, 40, "contiguous", (6, -1), None),
    (2, 30, "zigzag", (4, 1), (0, 7, 8, 30)),
    (3, 33, "balanced", (-1, -1), (0, 2, 20, 33)),
])
def test_masked_bytes_equal_the_analytic_volume(strategy, p, n, scheme, window, documents):
    for measured, want in world(p).run(_measure, strategy, n, scheme, window, documents):
        assert measured == want
