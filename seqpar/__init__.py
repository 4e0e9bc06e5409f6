"""seqpar: sequence-parallel (context-parallel) attention for long-context transformers.

Public contract: `SeqLayout`, `attention` and one function per strategy (see README);
drop-in pieces for existing models in `seqpar.nn`.
"""
from . import comm
from ._version import __version__
from .attention import attention
from .generation import StarKVCache, star_generate
from .planner import Plan, Topology, calibrate, plan, plan_linear
from .layout import SeqLayout
from .strategies.allgather import allgather_attention
from .strategies.delta import delta_attention
from .strategies.linear import linear_attention
from .strategies.ring import ring_attention
from .strategies.star import star_attention, star_query_attention
from .strategies.token_ring import token_ring_attention
from .strategies.ulysses import ulysses_attention
from .strategies.usp import usp_attention
from . import nn
from .nn import SequenceParallelAttention, scaled_dot_product_attention

__all__ = ["SeqLayout", "attention", "ring_attention", "allgather_attention", "linear_attention", "delta_attention", "token_ring_attention",
           "ulysses_attention", "usp_attention", "star_attention", "star_query_attention", "StarKVCache", "star_generate",
           "comm", "__version__", "nn", "SequenceParallelAttention", "scaled_dot_product_attention",
           "plan", "plan_linear", "calibrate", "Plan", "Topology"]
