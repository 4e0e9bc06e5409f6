"""bench/kernels.py (a GPU benchmark) runs end to end on cpu: `--device cpu --tiny`."""
import importlib.util
import os

import pytest
import torch

from seqpar.kernels import block

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "kernels.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_kernels", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_visible_pairs_counts_the_mask():
    bench = _load()
    assert bench.visible_pairs(4, 5, None) == 20
    assert bench.visible_pairs(4, 4, 0) == 10
    assert bench.visible_pairs(3, 5, -1) == 0 + 1 + 2
    assert bench.visible_pairs(2, 3, 10) == 6


@pytest.mark.skipif(block.unavailable_reason("triton", torch.device("cpu"), torch.float32, 16) is not None,
                    reason="needs Triton's interpreter on cpu")
def test_tiny_cpu_run_measures_every_table(tmp_path):
    bench = _load()
    out_file = tmp_path / "rows.json"
    rows = bench.main(["--device", "cpu", "--tiny", "--json", str(out_file)])
    assert out_file.exists()
    by_name = {(row["table"], row["contestant"], row.get("causal")): row for row in rows}
    for causal in (False, True):
        for name in ("seqpar triton", "seqpar sdpa block", "torch sdpa flash"):
            row = by_name[("block", name, causal)]
            assert "skipped" not in row, row
            assert row["fwd_s"] > 0 and row["bwd_s"] > 0 and row["fwd_tflops"] > 0
    merges = [row for row in rows if row["table"] == "merge"]
    assert {row["contestant"] for row in merges} >= {"fused triton merge", "reference merge_ (torch ops)"}
    assert all(row["gb_per_s"] > 0 for row in merges)
    rings = {row["contestant"]: row for row in rows if row["table"] == "ring"}
    for backend in ("triton", "sdpa"):
        ring = rings[f"ring emulation P=2, backend={backend}"]
        assert ring["vs_dense"] > 0
        assert ring["max_rel_err_vs_fp32_dense"] < 1e-5, ring
