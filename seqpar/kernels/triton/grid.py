"""Launch grids folded onto axis 0.

CUDA caps grid axes 1 and 2 at 65535 blocks; axis 0 allows 2^31 - 1. A grid of
`(tiles, batch x heads)` would fail to launch beyond 65535 batch x heads (4096 x 16), so
the kernels take one axis, `tiles x rows`, with the tiles of one row adjacent: they run
close together in time and share that row's operands in the cache, as on a 2-d grid.
"""
import triton
import triton.language as tl


@triton.jit
def tile_and_row(n, BLOCK: tl.constexpr):
    """(this program's tile index, its row) in a grid from `folded_grid(n, BLOCK, rows)`."""
    tiles = tl.cdiv(n, BLOCK)
    pid = tl.program_id(0)
    return pid % tiles, pid // tiles


def folded_grid(n: int, block: int, rows: int) -> tuple:
    """`cdiv(n, block)` tiles for each of `rows` (batch x heads), on axis 0."""
    programs = triton.cdiv(n, block) * rows
    if programs > 2 ** 31 - 1:
        raise ValueError(f"batch x heads: expected at most 2^31 - 1 programs in one launch ("
                         f"{triton.cdiv(n, block)} tiles of {block} tokens for each of batch x heads = {rows}), "
                         f"got {programs}; split the batch")
    return (programs,)
