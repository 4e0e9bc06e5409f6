"""The linear-attention bench runs end to end on a tiny problem and reports sound numbers."""
from seqpar.bench import linear as benchmark_linear


def test_linear_bench_smoke():
    cfg = benchmark_linear.LinearBenchConfig(
        world_sizes=(2,), seq_len=96, heads=2, key_dim=8, value_dim=4, repeats=1, warmup=0,
        chain_state_bytes=(4096,), chain_repeats=2, chunk_size=16,
    )
    report = benchmark_linear.run(cfg)
    methods = [row for row in report["rows"] if not row["name"].startswith("single")]
    assert [row["name"] for row in methods] == list(benchmark_linear.METHODS)
    for row in methods:
        assert row["bytes_forward"] == row["analytic_forward"] > 0
        assert row["bytes_backward"] == row["analytic_backward"] > 0
        assert row["max_rel_err"] < 1e-5
        assert row["forward_s"] > 0 and row["last_rank_wait_s"] >= 0
    assert {entry["method"] for entry in report["chain"]} == {"ring", "allscan", "allgather"}
    table = benchmark_linear.format_tables(report)
    assert "| allscan | 2 |" in table and "the chain alone" in table


def test_linear_bench_gla_and_delta_smoke():
    for kind in ("gla", "delta"):
        cfg = benchmark_linear.LinearBenchConfig(
            world_sizes=(2,), seq_len=64, heads=2, key_dim=8, value_dim=4, repeats=1, warmup=0,
            chain_state_bytes=(16384,), chain_repeats=2, chunk_size=16, kind=kind,
        )
        report = benchmark_linear.run(cfg)
        methods = [row for row in report["rows"] if not row["name"].startswith("single")]
        for row in methods:
            assert row["bytes_forward"] == row["analytic_forward"] > 0, (kind, row["name"])
            assert row["bytes_backward"] == row["analytic_backward"] > 0, (kind, row["name"])
            assert row["max_rel_err"] < 1e-5, (kind, row["name"])
        table = benchmark_linear.format_tables(report)
        assert ("gated delta rule" in table) == (kind == "delta") and ("GLA" in table) == (kind == "gla")
        if kind == "delta":
            # the all-gather moves a [Dk, Dk] transition beside every state
            gather = {row["name"]: row for row in methods}["allgather"]
            assert gather["bytes_forward"] == (2 * 8 * 4 + 2 * 8 * 8) * 4
