"""The memory benchmark's plumbing at a tiny size: peaks are measured per rank, compared
with dense and with the planner's analytic peak."""
import pytest

from seqpar.bench import memory

pytestmark = pytest.mark.skipif(memory.available() is not None, reason=f"{memory.available()}")


def test_memory_bench_measures_and_compares():
    cfg = memory.MemoryBenchConfig(world_sizes=(2,), seq_len=1024, heads=2, kv_heads=2, head_dim=16,
                                   strategies=("ring", "allgather", "allgather:kv_head_chunk=1"))
    report = memory.run(cfg)
    rows = {r["strategy"]: r for r in report["rows"]}
    assert set(rows) == {"dense (one process)", "ring", "allgather", "allgather:kv_head_chunk=1"}
    assert rows["allgather:kv_head_chunk=1"]["options"] == {"kv_head_chunk": 1}
    for name in ("ring", "allgather", "allgather:kv_head_chunk=1"):
        row = rows[name]
        assert len(row["per_rank"]) == 2 and row["peak"] == max(row["per_rank"]) > 0
        assert row["analytic"] > 0 and row["vs_analytic"] == row["peak"] / row["analytic"]
    assert "| 2 | ring |" in memory.format_table(report)



def test_row_specs():
    assert memory.parse_row("ring") == ("ring", {})
    assert memory.parse_row("allgather:kv_head_chunk=2") == ("allgather", {"kv_head_chunk": 2})
    with pytest.raises(ValueError, match="NAME:OPTION=INT, got 'allgather:kv_head_chunk'"):
        memory.parse_row("allgather:kv_head_chunk")
