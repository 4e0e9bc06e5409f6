"""torch.compile over seqpar's custom ops.

A strategy's entry point is a graph break under torch.compile and runs eagerly (traced, ring
attention with the triton backend got a zero incoming gradient on an H200: registry.run), so
compiled and eager agree exactly. The strategies' own loops, compiled directly (backend
aot_eager: AOT autograd and functionalization over the ops' fake kernels, then eager
kernels; inductor compiles for minutes on this 2-core machine) on a 2-rank gloo world,
break at the process-group calls, and each block is one `seqpar.block_forward` /
`block_backward` node. Without distributed code, a block loop with merges compiles as one
graph (`fullgraph=True`).
"""
import torch

import seqpar
from seqpar.kernels import block
from seqpar.layout import SeqLayout
from seqpar.strategies import ring
from seqpar.testing import world

SCALE = 8 ** -0.5


def _recording(graphs):
    """A torch.compile backend: aot_eager, keeping each Dynamo graph for inspection."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    return backend


def _targets(graphs):
    """Names of the functions the graphs call; Dynamo records an op by its packet
    (`seqpar.block_forward`), AOT graphs by its overload (`seqpar.block_forward.default`)."""
    names = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    return {name.removesuffix(".default") for name in names}


def _ring(q, k, v, layout):
    return seqpar.ring_attention(q, k, v, layout=layout, causal=True, backend="sdpa")


def _ring_passes(q, k, v, do, layout):
    # the strategy's own forward and backward loops, called directly: Dynamo traces into
    # them (an autograd.Function whose forward communicates runs eagerly as a whole)
    out, lse = ring._ring_forward(q, k, v, layout, True, SCALE, "sdpa")
    dq, dk, dv = ring._ring_backward(do, q, k, v, out.to(q.dtype), lse, layout, True, SCALE, "sdpa")
    return out, lse, dq, dk, dv


def _compiled_vs_eager(seed):
    torch._dynamo.reset()
    layout = SeqLayout(24, scheme="zigzag")
    gen = torch.Generator().manual_seed(seed)
    q, do = (layout.shard(torch.randn(2, 24, 4, 8, generator=gen)) for _ in range(2))
    k, v = (layout.shard(torch.randn(2, 24, 2, 8, generator=gen)) for _ in range(2))

    results, graphs = [], []
    for fn in (_ring, torch.compile(_ring, backend=_recording(graphs))):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves, layout)
        out.backward(do)
        results.append([out.detach()] + [t.grad for t in leaves])
    autograd_diff = [float((a - b).abs().max()) for a, b in zip(*results)]
    autograd_targets = _targets(graphs)

    graphs = []
    eager = _ring_passes(q, k, v, do, layout)
    compiled = torch.compile(_ring_passes, backend=_recording(graphs))(q, k, v, do, layout)
    passes_diff = [float((a - b).abs().max()) for a, b in zip(eager, compiled)]
    return autograd_diff, autograd_targets, passes_diff, _targets(graphs), len(graphs)


def test_ring_attention_compiles_on_two_ranks():
    for rank, (autograd_diff, autograd_targets, passes_diff, passes_targets, n_graphs) in enumerate(
            world(2).run(_compiled_vs_eager, 0)):
        assert max(autograd_diff) == 0.0, (rank, autograd_diff)  # the entry point runs eagerly
        assert max(passes_diff) <= 1e-6, (rank, passes_diff)
        assert not autograd_targets & {"seqpar.block_forward", "seqpar.block_backward"}, (rank, sorted(autograd_targets))
        assert {"seqpar.block_forward", "seqpar.block_backward"} <= passes_targets, rank
        assert n_graphs >= 2  # broken at the p2p exchanges, not one opaque call


def _blocks_and_merge(q, k, v):
    """Two blocks of the same queries, differentiable through block_forward's autograd
    formula, and their merge into one result (merge_ mutates an accumulator and has no
    autograd formula, as inside the strategies)."""
    fwd, _ = block.kernels("sdpa", q, k)
    out1, lse1 = fwd(q, k[:, :5], v[:, :5], SCALE, None)
    out2, lse2 = fwd(q, k[:, 5:], v[:, 5:], SCALE, 0)
    out, lse = out1.detach().clone(), lse1.detach().clone()
    torch.ops.seqpar.merge_(out, lse, out2.detach(), lse2.detach())
    loss = out1.square().sum() + lse1.sum() + (out2 * out2.detach()).sum() + (lse2 * 0.5).sum()
    return out, lse, loss


def test_block_loop_compiles_as_one_graph_with_gradients():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 4, 8, generator=gen)
    k, v = (torch.randn(1, 11, 2, 8, generator=gen) for _ in range(2))
    results, graphs = [], []
    for fn in (_blocks_and_merge, torch.compile(_blocks_and_merge, backend=_recording(graphs), fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse, loss = fn(*leaves)
        loss.backward()
        results.append([out.detach(), lse.detach()] + [t.grad for t in leaves])
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1
    assert {"seqpar.block_forward", "seqpar.merge_"} <= _targets(graphs)
    # and the merged blocks are attention over all 11 keys (block 2: offset 0 from key 5)
    i = torch.arange(6)[:, None]
    mask = torch.arange(11)[None, :] <= torch.where(torch.arange(11)[None, :] < 5, 10, i + 5)
    dense = torch.softmax((torch.einsum("bihd,bjhd->bhij", q, k.repeat_interleave(2, 2)) * SCALE)
                          .masked_fill(~mask, float("-inf")), -1)
    want_out = torch.einsum("bhij,bjhd->bihd", dense, v.repeat_interleave(2, 2))
    torch.testing.assert_close(results[1][0], want_out, rtol=1e-5, atol=1e-5)


def _linear_compiled_vs_eager():
    torch._dynamo.reset()
    layout = SeqLayout(20)
    gen = torch.Generator().manual_seed(layout.rank)
    q, k, v, do = (torch.randn(1, layout.local_len, 2, 8, generator=gen) for _ in range(4))
    k = torch.nn.functional.normalize(k, dim=-1)
    beta = torch.rand(1, layout.local_len, 2, generator=gen)
    g = -torch.rand(1, layout.local_len, 2, generator=gen)

    def linear(q, k, v, beta, g):
        return seqpar.linear_attention(q, k, v, layout=layout, decay=g, method="allscan")

    def delta(q, k, v, beta, g):
        return seqpar.delta_attention(q, k, v, beta, layout=layout, decay=g, method="allscan")

    diffs = []
    for fn in (linear, delta):
        results = []
        for f in (fn, torch.compile(fn, backend="aot_eager")):
            leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, g)]
            out = f(*leaves)
            out.backward(do)
            results.append([out.detach()] + [t.grad for t in leaves if t.grad is not None])
        diffs.append(max(float((a - b).abs().max()) for a, b in zip(*results)))
    return diffs


def test_linear_and_delta_attention_run_eagerly_under_compile():
    for rank, diffs in enumerate(world(2).run(_linear_compiled_vs_eager)):
        assert diffs == [0.0, 0.0], (rank, diffs)
