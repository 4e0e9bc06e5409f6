"""Every softmax strategy and every linear-attention method on q, k, v and dO stored in every
memory layout of `checks.MEMORY_LAYOUTS`, against float64 dense attention on 2 ranks (the
default backend). Strided head dims once came back as garbage from PyTorch's fused CPU op."""
import pytest

import seqpar
from seqpar.testing import AttentionProblem, LinearProblem, assert_matches_dense, check_attention, check_linear_attention, world
from seqpar.testing.checks import MEMORY_LAYOUTS

SOFTMAX = {
    "ring": seqpar.ring_attention,
    "ulysses": seqpar.ulysses_attention,
    "usp": seqpar.usp_attention,
    "allgather": seqpar.allgather_attention,
    "token_ring": seqpar.token_ring_attention,
}


@pytest.mark.parametrize("memory_layout", MEMORY_LAYOUTS)
@pytest.mark.parametrize("strategy", sorted(SOFTMAX))
def test_softmax_strategy_any_memory_layout(strategy, memory_layout):
    problem = AttentionProblem(2, 13, batch=2, heads=4, kv_heads=2, head_dim=6, causal=True, scheme="zigzag",
                               seed=5, memory_layout=memory_layout)
    report = world(2).run(check_attention, problem, SOFTMAX[strategy])[0]
    assert_matches_dense(problem, report)


@pytest.mark.parametrize("memory_layout", MEMORY_LAYOUTS)
@pytest.mark.parametrize("method", ["ring", "allgather", "allscan"])
def test_linear_method_any_memory_layout(method, memory_layout):
    problem = LinearProblem(2, 13, batch=2, heads=2, key_dim=5, value_dim=3, decay="token", seed=5,
                            memory_layout=memory_layout)
    report = world(2).run(check_linear_attention, problem, method=method)[0]
    assert_matches_dense(problem, report)
