"""seqpar: sequence-parallel (context-parallel) attention for long-context transformers.

Public contract: `SeqLayout`, `attention`, `ring_attention` (see README and API.md).
"""
from . import comm
from ._version import __version__
from .attention import attention
from .layout import SeqLayout
from .strategies.ring import ring_attention

__all__ = ["SeqLayout", "attention", "ring_attention", "comm", "__version__"]
