"""`python -m seqpar bench --grid` on a tiny grid: the machinery, not the numbers."""
import contextlib
import importlib.util
import io
import json

from seqpar.bench.exact import main as bench_main


def test_grid_runs_every_feasible_strategy_and_reports(tmp_path):
    json_path, png_path = tmp_path / "grid.json", tmp_path / "grid.png"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = bench_main(["--grid", "--world-sizes", "2", "--seq-lens", "32", "64", "--heads", "2:2", "2:1",
                           "--head-dim", "8", "--repeats", "1", "--max-repeats", "2", "--seconds-per-point", "1000",
                           "--warmup", "1", "--json", str(json_path),
                           "--png", str(png_path)])
    assert code == 0
    report = json.loads(json_path.read_text())
    assert len(report["points"]) == 4
    names = {(p["seq_len"], p["kv_heads"]): set() for p in report["points"]}
    for row in report["rows"]:
        assert row["predicted_s"] > 0 and row["measured_s"] > 0 and len(row["times_s"]) == 2  # the budget allows the maximum
        names[(row["seq_len"], row["kv_heads"])].add(row["candidate"])
    for names_at_point in names.values():
        assert {"ring", "ulysses", "allgather", "token_ring(route=direct)"} <= names_at_point
    for point in report["points"]:
        autos = [r for r in report["rows"] if r["auto"] and (r["seq_len"], r["kv_heads"]) ==
                 (point["seq_len"], point["kv_heads"])]
        assert len(autos) == 1 and autos[0]["candidate"] == point["auto"]
        fastest = min((r for r in report["rows"] if (r["seq_len"], r["kv_heads"]) ==
                       (point["seq_len"], point["kv_heads"])), key=lambda r: r["measured_s"])
        assert point["best"] == fastest["candidate"]
        assert point["auto_ok"] == (point["auto_vs_best"] <= 1.1)
        auto_times = next(r for r in autos)["times_s"]
        ratios = sorted(a / b for a, b in zip(auto_times, fastest["times_s"]))
        assert abs(point["auto_vs_best"] - sum(ratios) / 2) < 1e-12  # the paired median of two rounds
    assert report["auto_win_fraction"] == sum(p["auto_ok"] for p in report["points"]) / 4
    assert set(report["topologies"]) == {"2"}
    text = out.getvalue()
    assert "| P | N | H | H_kv | strategy | predicted s | measured s" in text
    assert "auto within 1.1x of the fastest measured strategy at" in text
    assert "[4/4] P=2 N=64 H=2 H_kv=1" in err.getvalue()
    if importlib.util.find_spec("matplotlib") is None:
        assert report["png"] is None and "matplotlib is not installed" in report["png_note"]
        assert not png_path.exists()
    else:
        assert report["png"] == str(png_path) and png_path.stat().st_size > 0


def test_grid_stops_on_its_time_budget_and_reprints_a_saved_run(tmp_path, capfd):
    json_path = tmp_path / "grid.json"
    assert bench_main(["--grid", "--world-sizes", "2", "--seq-lens", "32", "--heads", "2:2", "--head-dim", "8",
                       "--repeats", "1", "--max-repeats", "3", "--seconds-per-point", "0", "--warmup", "0",
                       "--out-dir", str(tmp_path), "--png", ""]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err and "[1/1] P=2 N=32 H=2 H_kv=2: timed round 1" in err  # plain lines in a log
    stamped = list(tmp_path.glob("grid-*.json"))
    assert len(stamped) == 1 and str(stamped[0]) in err
    report = json.loads(json_path.read_text())
    assert json.loads(stamped[0].read_text()) == report
    assert report["rows"] and all(len(row["times_s"]) == 1 for row in report["rows"])  # the budget ran out
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench_main(["--grid", "--table", str(json_path)]) == 0
    text = out.getvalue()
    assert "best round s" in text and "auto within 1.1x of the fastest measured strategy at" in text
    assert text.count("| 2 | 32 | 2 | 2 |") == len(report["rows"]) + 1  # every row, and the point
