"""Drop-in pieces for existing models.

- `SequenceParallelAttention`: core attention as an nn.Module (no parameters).
- `functional.scaled_dot_product_attention`: torch's SDPA signature over sequence shards;
  `functional.sdpa_patched(layout)` swaps it in for `F.scaled_dot_product_attention` in a block.
- `cu_seqlens_of` (a packed batch's documents, for the layout), `shard_batch`,
  `cross_entropy_share`, `global_loss`, `all_reduce_gradients`: train on shards with
  single-process training's loss and gradients (convention in `training.py`).
"""
from . import functional
from .functional import scaled_dot_product_attention, sdpa_patched
from .modules import SequenceParallelAttention
from .training import (IGNORE_INDEX, all_reduce_gradients, cross_entropy_share, cu_seqlens_of, global_loss,
                       shard_batch)

__all__ = [
    "SequenceParallelAttention", "functional", "scaled_dot_product_attention", "sdpa_patched", "shard_batch",
    "cross_entropy_share", "global_loss", "all_reduce_gradients", "IGNORE_INDEX", "cu_seqlens_of",
]
