"""How the examples run: under torchrun each process is a rank of the launched group; run
as `python examples/X.py` they start a local gloo world of `--world-size` ranks."""
import os

import torch.distributed as dist


def launch(fn, *args, world_size: int, timeout=None) -> list:
    """`fn(*args)` on every rank. Under torchrun: `[this rank's result]`; else every rank's
    results, in rank order, from a local world of `world_size` processes."""
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("gloo")
        try:
            return [fn(*args)]
        finally:
            dist.destroy_process_group()
    from seqpar.testing import LocalWorld

    local_world = LocalWorld(world_size)
    try:
        return local_world.run(fn, *args, **({} if timeout is None else {"timeout": timeout}))
    finally:
        local_world.close()
