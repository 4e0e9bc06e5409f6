"""Bytes and calls per rank per operation, recorded only while someone asks.

    with seqpar.comm.track() as stats:
        out = seqpar.ring_attention(q, k, v, layout=layout, causal=True)
    stats.bytes_sent("ring.forward.kv")

Every communication helper in `seqpar.comm` reports here; tests compare the counts with
each algorithm's analytic volume, benchmarks print them beside times.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List


@dataclass
class OpStats:
    calls: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_seconds: float = 0.0  # time spent blocked on this operation's completion (where timed)


@dataclass
class CommStats:
    """Per-operation counts for this rank. Operation names are `strategy.phase.what`."""

    ops: Dict[str, OpStats] = field(default_factory=dict)

    def record(self, op: str, sent: int, received: int) -> None:
        entry = self.ops.setdefault(op, OpStats())
        entry.calls += 1
        entry.bytes_sent += sent
        entry.bytes_received += received

    def record_wait(self, op: str, seconds: float) -> None:
        self.ops.setdefault(op, OpStats()).wait_seconds += seconds

    def _select(self, prefix: str) -> List[OpStats]:
        return [s for name, s in self.ops.items() if name == prefix or name.startswith(prefix + ".") or not prefix]

    def bytes_sent(self, prefix: str = "") -> int:
        """Bytes this rank sent in operations named `prefix` or `prefix.*` (all when empty)."""
        return sum(s.bytes_sent for s in self._select(prefix))

    def bytes_received(self, prefix: str = "") -> int:
        return sum(s.bytes_received for s in self._select(prefix))

    def calls(self, prefix: str = "") -> int:
        return sum(s.calls for s in self._select(prefix))

    def wait_seconds(self, prefix: str = "") -> float:
        """Seconds this rank was blocked waiting on operations named `prefix` or `prefix.*`."""
        return sum(s.wait_seconds for s in self._select(prefix))

    def as_dict(self) -> Dict[str, Dict[str, int]]:
        return {name: vars(s).copy() for name, s in sorted(self.ops.items())}


_active: List[CommStats] = []


@contextlib.contextmanager
def track() -> Iterator[CommStats]:
    """Count every seqpar communication of this process inside the block."""
    stats = CommStats()
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)


def record(op: str, sent: int = 0, received: int = 0) -> None:
    for stats in _active:
        stats.record(op, sent, received)


def tracking() -> bool:
    """Whether anyone is counting (so callers can skip timing work nobody reads)."""
    return bool(_active)


def record_wait(op: str, seconds: float) -> None:
    for stats in _active:
        stats.record_wait(op, seconds)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
