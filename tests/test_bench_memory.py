"""The memory benchmark's plumbing at a tiny size: peaks are measured per rank, compared
with dense and with the planner's analytic peak."""
import pytest

from seqpar.bench import memory

pytestmark = pytest.mark.skipif(memory.available() is not None, reason=f"{memory.available()}")


def test_memory_bench_measures_and_compares():
    cfg = memory.MemoryBenchConfig(world_sizes=(2,), seq_len=1024, heads=2, kv_heads=2, head_dim=16,
                                   strategies=("ring", "allgather"))
    report = memory.run(cfg)
    rows = {r["strategy"]: r for r in report["rows"]}
    assert set(rows) == {"dense (one process)", "ring", "allgather"}
    for name in ("ring", "allgather"):
        row = rows[name]
        assert len(row["per_rank"]) == 2 and row["peak"] == max(row["per_rank"]) > 0
        assert row["analytic"] > 0 and row["vs_analytic"] == row["peak"] / row["analytic"]
    assert "| 2 | ring |" in memory.format_table(report)

