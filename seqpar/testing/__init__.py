"""Test your attention against dense attention on a real local multi-rank world.

    from seqpar.testing import AttentionProblem, world, check_attention, assert_matches_dense
    problem = AttentionProblem(world_size=2, seq_len=37, causal=True, scheme="zigzag")
    report = world(2).run(check_attention, problem, my_attention)[0]
    assert_matches_dense(problem, report)

`seqpar.testing.strategies.attention_problems()` draws such problems for hypothesis.
"""
from .checks import (
    FLOAT64_RTOL,
    FORWARD_FACTOR,
    GRAD_FACTOR,
    AttentionProblem,
    DeltaProblem,
    LinearProblem,
    assert_matches_dense,
    check_attention,
    check_delta_attention,
    check_linear_attention,
    tolerance_violations,
)
from .world import LocalWorld, RankError, WorldDied, WorldTimeout, close_all, world

__all__ = [
    "AttentionProblem", "LinearProblem", "check_linear_attention", "DeltaProblem", "check_delta_attention", "LocalWorld", "RankError", "WorldDied", "WorldTimeout", "assert_matches_dense", "check_attention",
    "close_all", "tolerance_violations", "world", "FLOAT64_RTOL", "FORWARD_FACTOR", "GRAD_FACTOR",
]
