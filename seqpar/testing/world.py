"""A persistent local world: P gloo ranks spawned once, then sent work.

Spawning a process group costs seconds (each rank imports torch); a test suite that
spawned per test would spend its time there. `LocalWorld(P)` starts P processes once;
`world.run(fn, *args)` runs `fn(*args)` on every rank collectively and returns the
per-rank results. `fn` must be picklable (a module-level function). A rank that raises
makes `run` raise `RankError` carrying every rank's outcome; `run(..., return_exceptions=True)`
returns the exceptions instead. A run that exceeds its timeout kills the world (the next
`world(P)` starts a fresh one) and raises `WorldTimeout`: a hang is a failure, not a wait.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import socket
import time
import traceback
from typing import Any, Callable, Dict, List, Optional


class WorldTimeout(RuntimeError):
    """A rank did not finish within the timeout; the world was killed."""


class WorldDied(RuntimeError):
    """A rank's process ended (crashed, was killed, or aborted inside a collective)."""


class RankError(RuntimeError):
    def __init__(self, outcomes: List[Any], tracebacks: List[Optional[str]]):
        self.outcomes = outcomes
        self.tracebacks = tracebacks
        lines = [f"rank {r}: {tb.strip().splitlines()[-1]}" for r, tb in enumerate(tracebacks) if tb]
        first = next(tb for tb in tracebacks if tb)
        super().__init__("\n".join(lines) + "\n\nfirst failing rank's traceback:\n" + first)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, conn, threads: int, backend: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        while True:
            task = conn.recv()
            if task is None:
                break
            fn, args, kwargs = task
            try:
                conn.send(("ok", fn(*args, **kwargs), None))
            except BaseException as exc:  # report everything, the parent decides
                tb = traceback.format_exc()
                try:
                    conn.send(("err", exc, tb))
                except Exception:  # an exception that does not pickle
                    conn.send(("err", RuntimeError(repr(exc)), tb))
    finally:
        dist.destroy_process_group()


class LocalWorld:
    """P ranks of a gloo process group on this machine, each a persistent process."""

    def __init__(self, world_size: int, *, threads_per_rank: Optional[int] = None, backend: str = "gloo",
                 timeout: float = 300.0):
        if world_size < 1:
            raise ValueError(f"world_size: expected at least 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        # default: SEQPAR_THREADS_PER_RANK if set (the test suite sets 1), else the cores shared out
        threads = threads_per_rank or int(os.environ.get("SEQPAR_THREADS_PER_RANK", 0)) or max(
            1, (os.cpu_count() or 1) // world_size)
        ctx = mp.get_context("spawn")
        port = _free_port()
        self._conns, self._procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(rank, world_size, port, child, threads, backend), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def run(self, fn: Callable, *args, timeout: Optional[float] = None, return_exceptions: bool = False, **kwargs):
        """Run `fn(*args, **kwargs)` on every rank; the list of results by rank."""
        if not self.alive:
            raise WorldDied("this LocalWorld has been closed or lost a rank; seqpar.testing.world() starts a new one")
        name = getattr(fn, "__name__", fn)
        limit = self.timeout if timeout is None else timeout
        outcomes, tracebacks = [None] * self.world_size, [None] * self.world_size
        try:
            for conn in self._conns:
                conn.send((fn, args, kwargs))
            deadline = time.monotonic() + limit
            waiting = dict(enumerate(self._conns))
            while waiting:
                ready = mp_connection.wait(list(waiting.values()), timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    finished = [
                        f"rank {r}: " + (tracebacks[r].strip().splitlines()[-1] if tracebacks[r] else "returned")
                        for r in range(self.world_size) if r not in waiting
                    ]
                    self.close(force=True)
                    raise WorldTimeout(
                        f"rank(s) {sorted(waiting)} did not finish {name} within {limit} s"
                        + (f"; meanwhile {'; '.join(finished)}" if finished else "")
                    )
                for rank in [r for r, c in waiting.items() if c in ready]:
                    status, value, tb = waiting.pop(rank).recv()
                    outcomes[rank] = value
                    tracebacks[rank] = tb if status == "err" else None
        except (EOFError, OSError) as exc:  # a rank died: its pipe closed or reset
            codes = [p.exitcode for p in self._procs]
            self.close(force=True)
            raise WorldDied(f"a rank died while running {name} (exit codes by rank: {codes})") from exc
        if any(tracebacks) and not return_exceptions:
            raise RankError(outcomes, tracebacks)
        return outcomes

    def close(self, force: bool = False) -> None:
        for conn, proc in zip(self._conns, self._procs):
            if not force and proc.is_alive():
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    continue  # that rank is already gone; the join below reaps it
        for proc in self._procs:
            proc.join(timeout=0 if force else 10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._conns, self._procs = [], []


_worlds: Dict[int, LocalWorld] = {}


def world(world_size: int, **kwargs) -> LocalWorld:
    """The shared LocalWorld of this size for this process, started on first use."""
    current = _worlds.get(world_size)
    if current is None or not current.alive:
        current = _worlds[world_size] = LocalWorld(world_size, **kwargs)
    return current


def close_all() -> None:
    for w in list(_worlds.values()):
        w.close()
    _worlds.clear()


atexit.register(close_all)
