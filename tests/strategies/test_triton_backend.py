"""Every exact strategy with backend="triton" against dense attention on real gloo worlds.

Without CUDA the ranks run Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1
before the worlds are spawned, and spawned ranks inherit it. Each rank counts the calls
that reach the Triton block kernels and the fused merge, so a silent fallback to another
backend fails the test.
"""
import pytest
import torch

import seqpar
from seqpar.kernels import block
from seqpar.testing import AttentionProblem, assert_matches_dense, check_attention, world

_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_REASON = block.unavailable_reason("triton", _DEVICE, torch.float32, 64)
pytestmark = pytest.mark.skipif(_DEVICE.type != "cpu" or _REASON is not None,
                                reason=f"cpu worlds with the triton interpreter: {_REASON or 'cuda present'}")

FUNCTIONS = {
    "ring": seqpar.ring_attention,
    "ulysses": seqpar.ulysses_attention,
    "usp": seqpar.usp_attention,
    "allgather": seqpar.allgather_attention,
    "token_ring": seqpar.token_ring_attention,
}


def _check_with_triton(problem, strategy, options):
    """On each rank: check_attention with backend='triton', counting the Triton calls."""
    from seqpar.kernels.triton import attention as triton_attention
    from seqpar.kernels.triton import merge as triton_merge

    counts = {"forward": 0, "backward": 0, "merge": 0}
    originals = (triton_attention.forward, triton_attention.backward, triton_merge.merge_)

    def counted(name, fn):
        def call(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return call

    triton_attention.forward = counted("forward", originals[0])
    triton_attention.backward = counted("backward", originals[1])
    triton_merge.merge_ = counted("merge", originals[2])
    try:
        report = check_attention(problem, FUNCTIONS[strategy], backend="triton", **options)
    finally:
        triton_attention.forward, triton_attention.backward, triton_merge.merge_ = originals
    return report, counts


# (strategy, problem, options): uneven lengths throughout, every scheme, GQA, fp32 and fp16
CASES = {
    "ring-zigzag-fp32": ("ring", AttentionProblem(2, 23, heads=4, kv_heads=2, head_dim=12, causal=True,
                                                  scheme="zigzag", dtype="float32", seed=1), {}),
    "ring-stripe-p3-fp16": ("ring", AttentionProblem(3, 29, heads=2, kv_heads=1, head_dim=16, causal=True,
                                                     scheme="stripe", dtype="float16", seed=2), {}),
    "ring-contiguous-noncausal-p3-fp32": ("ring", AttentionProblem(3, 31, batch=2, heads=2, kv_heads=2, head_dim=8,
                                                                   causal=False, dtype="float32", seed=3), {}),
    "ulysses-zigzag-fp16": ("ulysses", AttentionProblem(2, 21, heads=4, kv_heads=2, head_dim=12, causal=True,
                                                        scheme="zigzag", dtype="float16", seed=4), {}),
    "ulysses-stripe-fp32": ("ulysses", AttentionProblem(2, 19, heads=2, kv_heads=2, head_dim=20, causal=True,
                                                        scheme="stripe", dtype="float32", seed=5), {}),
    "usp-p4-u2-zigzag-fp32": ("usp", AttentionProblem(4, 27, heads=2, kv_heads=2, head_dim=8, causal=True,
                                                      scheme="zigzag", dtype="float32", seed=6), {"ulysses_size": 2}),
    "usp-p2-u1-stripe-fp16": ("usp", AttentionProblem(2, 25, heads=2, kv_heads=1, head_dim=8, causal=True,
                                                      scheme="stripe", dtype="float16", seed=7), {"ulysses_size": 1}),
    "allgather-stripe-fp32": ("allgather", AttentionProblem(2, 22, heads=4, kv_heads=2, head_dim=8, causal=True,
                                                            scheme="stripe", dtype="float32", seed=8),
                              {"kv_head_chunk": 1}),
    "allgather-zigzag-p3-fp16": ("allgather", AttentionProblem(3, 20, heads=2, kv_heads=1, head_dim=12, causal=True,
                                                               scheme="zigzag", dtype="float16", seed=9), {}),
    "token_ring-direct-zigzag-fp16": ("token_ring", AttentionProblem(2, 23, heads=2, kv_heads=2, head_dim=12,
                                                                     causal=True, scheme="zigzag", dtype="float16",
                                                                     seed=10), {"route": "direct"}),
    "token_ring-ring-contiguous-p3-fp32": ("token_ring", AttentionProblem(3, 26, heads=4, kv_heads=2, head_dim=8,
                                                                          causal=True, dtype="float32", seed=11),
                                           {"route": "ring"}),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_strategy_with_triton_matches_dense(case):
    strategy, problem, options = CASES[case]
    results = world(problem.world_size).run(_check_with_triton, problem, strategy, options)
    report = results[0][0]
    assert_matches_dense(problem, report)
    for rank, (_, counts) in enumerate(results):
        assert counts["forward"] > 0 and counts["backward"] > 0, f"rank {rank} did not use the triton kernels: {counts}"
    if strategy != "ulysses":
        # several blocks per row somewhere (plain Ulysses attends each head's whole sequence
        # in one block: nothing to merge)
        assert sum(counts["merge"] for _, counts in results) > 0, [counts for _, counts in results]
