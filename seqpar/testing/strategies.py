"""Hypothesis strategies that draw attention problems (needs `hypothesis`: the test extra)."""
from __future__ import annotations

from typing import Sequence

from hypothesis import strategies as st

from ..layout import SCHEMES
from .checks import MEMORY_LAYOUTS, AttentionProblem


def memory_layouts():
    """How q, k, v and dO are stored (`checks.MEMORY_LAYOUTS`)."""
    return st.sampled_from(list(MEMORY_LAYOUTS))


@st.composite
def attention_problems(
    draw,
    world_sizes: Sequence[int] = (1, 2, 3, 4),
    schemes: Sequence[str] = SCHEMES,
    dtypes: Sequence[str] = ("float64", "float32", "bfloat16"),
    max_tokens_per_rank: int = 12,
    max_batch: int = 2,
    value_dims: bool = True,
    sinks: bool = True,
):
    """Problems with P in `world_sizes`, tiny and uneven lengths (down to N = P), MHA, GQA
    and MQA, head dims that are not powers of two, a value head dim of its own (MLA) a third
    of the time when `value_dims`, causal or not, every scheme, and logit
    scales from gentle to saturating, every memory layout of q, k, v and dO, packed
    documents (`documents()`) and sliding windows (`windows()`) half the time each, a
    logit softcap (gentle to biting) half the time, attention sinks a quarter of the time
    when `sinks`."""
    world_size = draw(st.sampled_from(list(world_sizes)))
    seq_len = draw(st.integers(world_size, world_size * max_tokens_per_rank))
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    group = draw(st.sampled_from([1, 2, 4]))
    return AttentionProblem(
        world_size=world_size,
        seq_len=seq_len,
        batch=draw(st.integers(1, max_batch)),
        heads=kv_heads * group,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8, 12, 16, 24, 33, 64])),
        causal=draw(st.booleans()),
        scheme=draw(st.sampled_from(list(schemes))),
        dtype=draw(st.sampled_from(list(dtypes))),
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0, 16.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        memory_layout=draw(memory_layouts()),
        documents=draw(st.one_of(st.none(), documents(seq_len))),
        window=draw(st.one_of(st.just((-1, -1)), windows(seq_len))),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.0, 1.0, 5.0, 30.0])),
        value_dim=draw(st.sampled_from([None, None, 3, 16])) if value_dims else None,
        sinks=draw(st.sampled_from([False, False, False, True])) if sinks else False,
    )


@st.composite
def windows(draw, seq_len: int):
    """`window_size` pairs (left, right): a row that sees only itself (0, 0), windows
    narrower than a rank's share, windows crossing several ranks, one side unbounded."""
    side = st.one_of(st.just(-1), st.integers(0, 3), st.integers(0, max(0, seq_len)))
    return (draw(side), draw(side))


@st.composite
def documents(draw, seq_len: int):
    """Document boundaries `[0, ..., seq_len]` (cu_seqlens) of packed documents: lengths
    down to 1 token, fewer tokens than ranks, one long document among short ones."""
    count = draw(st.integers(1, min(seq_len, 8)))
    cuts = draw(st.lists(st.integers(1, seq_len - 1), min_size=count - 1, max_size=count - 1, unique=True)) \
        if seq_len > 1 else []
    return (0,) + tuple(sorted(cuts)) + (seq_len,)


def _state_problem(draw, cls, decays, world_sizes, dtypes, max_tokens_per_rank):
    """One `cls` problem (`LinearProblem` or `DeltaProblem`): tiny and uneven lengths (down to
    N = P), Dk != Dv and not powers of two, a decay form among `decays`, every memory layout,
    packed documents about half the time."""
    world_size = draw(st.sampled_from(list(world_sizes)))
    seq_len = draw(st.integers(world_size, world_size * max_tokens_per_rank))
    return cls(
        world_size=world_size,
        seq_len=seq_len,
        batch=draw(st.integers(1, 2)),
        heads=draw(st.integers(1, 3)),
        key_dim=draw(st.sampled_from([1, 4, 5, 8, 16])),
        value_dim=draw(st.sampled_from([1, 3, 8, 12])),
        decay=draw(st.sampled_from(list(decays))),
        dtype=draw(st.sampled_from(list(dtypes))),
        scale=draw(st.sampled_from([0.25, 0.5, 1.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
        memory_layout=draw(memory_layouts()),
        documents=draw(st.one_of(st.none(), documents(seq_len))),
    )


@st.composite
def linear_problems(
    draw,
    world_sizes: Sequence[int] = (1, 2, 3, 4),
    dtypes: Sequence[str] = ("float64",),
    max_tokens_per_rank: int = 12,
    decays: Sequence[str] = None,
):
    """Linear-attention problems: P in `world_sizes`, tiny and uneven lengths (down to N = P),
    Dk != Dv and not powers of two, every decay form (none, per head, per token, per key
    channel; or those in `decays`), every memory layout of q, k, v and dO, and packed
    documents (`documents()`: lengths down to 1, documents across several ranks) about half
    the time."""
    from .checks import DECAYS, LinearProblem

    return _state_problem(draw, LinearProblem, DECAYS if decays is None else decays, world_sizes, dtypes,
                          max_tokens_per_rank)


@st.composite
def delta_problems(
    draw,
    world_sizes: Sequence[int] = (1, 2, 3, 4),
    dtypes: Sequence[str] = ("float64",),
    max_tokens_per_rank: int = 12,
    decays: Sequence[str] = None,
):
    """Gated-delta-rule problems: as `linear_problems` (tiny uneven lengths, Dk != Dv, every
    memory layout, packed documents about half the time) with decay none, per head or per
    token (or those in `decays`)."""
    from .checks import DELTA_DECAYS, DeltaProblem

    return _state_problem(draw, DeltaProblem, DELTA_DECAYS if decays is None else decays, world_sizes, dtypes,
                          max_tokens_per_rank)
