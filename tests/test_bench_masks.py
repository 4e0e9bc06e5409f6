"""The masks benchmark's plumbing at a tiny size: every row ran, its bytes equal the
analytic count and its output matches float64 dense attention with the mask."""
from seqpar.bench import masks


def test_masks_bench_runs_and_checks_itself():
    cfg = masks.MaskBenchConfig(world_sizes=(2,), seq_len=96, heads=2, kv_heads=1, head_dim=8, repeats=1, warmup=0,
                                windows=(8, 2))
    report = masks.run(cfg)
    rows = [r for r in report["windows"] + report["documents"] if "bytes_forward" in r]
    assert [r["case"] for r in report["windows"]] == [
        "dense causal (one process, SDPA)", "ring, no window", "ring, window N/8", "ring, window N/2",
        "allgather, no window", "allgather, window N/8", "allgather, window N/2"]
    assert [r["case"] for r in report["documents"]] == [
        "dense, document mask (one process, SDPA)", "ring, contiguous", "ring, zigzag", "ring, balanced"]
    for row in rows:
        assert row["bytes_equal_analytic"], row
        assert row["error"] < 1e-5, row
    # a window of N/8 inside shares of N/2 sends a quarter of the unwindowed ring's rows,
    # and all-gather (rank 0 sends its last N/8 rows, and gets their dK/dV back) too
    assert report["windows"][2]["bytes_vs_unwindowed"] == 0.25
    assert report["windows"][5]["bytes_vs_unwindowed"] == 0.25
    table = masks.format_tables(report)
    assert "| 2 | ring, window N/8 |" in table and "(differs from analytic!)" not in table


def test_length_mix_covers_the_sequence():
    bounds = masks.length_mix(4096, seed=3)
    assert bounds[0] == 0 and bounds[-1] == 4096 and all(a < b for a, b in zip(bounds, bounds[1:]))
    lengths = sorted(b - a for a, b in zip(bounds, bounds[1:]))
    assert lengths[-3:] == [512, 512, 1024]
