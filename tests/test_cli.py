"""The command line: `python -m seqpar bench` and `plan` (profiles, flags, help, outputs, progress)."""
import io
import json
import types

import pytest

from seqpar import __main__ as cli
from seqpar.planner import cli as plan_cli
from seqpar.bench import exact as benchmark
from seqpar.bench import linear as benchmark_linear


def test_unknown_command_is_named_with_the_known_ones_and_exits_2(capsys):
    assert cli.main(["foo"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'foo'" in err and "bench, plan" in err


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("ranks P of the local world (under torchrun: the launched group) (default: 2)",
                    "(default: 8192; --long 16384, --quick 2048)", "(default: zigzag)", "(default: float32)",
                    "causal attention (default: True)", "(default: 3)", "(default: on)"):
        assert default in text, default
    assert "(default: None)" not in text
    with pytest.raises(SystemExit):
        plan_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "query heads H (default: 32)" in text and "(default: bfloat16)" in text
    assert "(default: None)" not in text


def test_causal_is_a_boolean_flag():
    parser = benchmark.build_parser()
    assert parser.parse_args([]).causal is True
    assert parser.parse_args(["--no-causal"]).causal is False
    assert parser.parse_args(["--causal"]).causal is True
    with pytest.raises(SystemExit):  # a value no longer silently means False
        parser.parse_args(["--causal", "0"])


def _record(monkeypatch):
    calls = {}

    def fake_run(cfg, strategies=None, peers=True, json_path=None, kind="bench"):
        if kind == "bench":
            calls["bench"] = (cfg, peers, json_path)
        else:  # the small-problem rows after the main ones
            calls.setdefault("small", []).append((cfg.seq_len, kind, json_path))

    def fake_linear(cfg):
        calls["linear"] = cfg
        return {"config": {}, "rows": [], "chain": [], "date": "now"}

    monkeypatch.setattr(benchmark, "run", fake_run)
    monkeypatch.setattr(benchmark_linear, "run", fake_linear)
    monkeypatch.setattr(benchmark_linear, "format_tables", lambda report: "tables")
    return calls


@pytest.mark.parametrize("flags, exact, linear, chain", [
    ([], 8192, 16384, 10), (["--long"], 16384, 65536, 30), (["--quick"], 2048, 4096, 5),
    (["--long", "--seq-len", "4096", "--linear-seq-len", "1024"], 4096, 1024, 30),
])
def test_profiles_default_long_quick(monkeypatch, tmp_path, capsys, flags, exact, linear, chain):
    calls = _record(monkeypatch)
    assert benchmark.main(flags + ["--out-dir", str(tmp_path)]) == 0
    cfg, peers, json_path = calls["bench"]
    assert cfg.seq_len == exact and cfg.world_size == 2 and peers
    assert json_path == str(tmp_path / "latest.json")
    assert calls["linear"].seq_len == linear and calls["linear"].world_sizes == (2, 4)
    assert calls["linear"].chain_repeats == chain
    assert (tmp_path / "linear.json").exists() and len(list(tmp_path.glob("linear-*.json"))) == 1
    # small-problem rows with the default and --long profiles, none with --quick or --seq-len
    expected = [] if "--quick" in flags or "--seq-len" in flags else [
        (n, f"small{n}", str(tmp_path / f"small-{n}.json")) for n in (2048, 4096)]
    assert calls.get("small", []) == expected
    capsys.readouterr()


def test_quick_and_long_exclude_each_other(monkeypatch, capsys):
    _record(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--quick", "--long"])
    assert exc.value.code == 2


def test_every_run_gets_its_own_timestamped_file_beside_the_latest(tmp_path, capsys):
    latest = tmp_path / "out" / "latest.json"
    first = benchmark.write_json({"run": 1}, str(latest), kind="bench")
    second = benchmark.write_json({"run": 2}, str(latest), kind="bench")
    assert first != second and first.parent == second.parent == latest.parent
    assert first.name.startswith("bench-") and second.name.startswith("bench-")
    assert json.loads(first.read_text()) == {"run": 1} and json.loads(second.read_text()) == {"run": 2}
    assert json.loads(latest.read_text()) == {"run": 2}
    assert str(second) in capsys.readouterr().err
    assert benchmark.write_json({"run": 3}, "", kind="bench") is None


def test_default_out_dir_is_the_checkouts_bench_out_else_the_cwd(monkeypatch, tmp_path):
    root = benchmark.repo_root()
    assert root is not None and benchmark.default_out_dir() == root / "bench" / "out"
    from seqpar.bench import common

    monkeypatch.setattr(common, "__file__", str(tmp_path / "site-packages" / "seqpar" / "bench" / "common.py"))
    monkeypatch.chdir(tmp_path)
    assert benchmark.repo_root() is None and benchmark.default_out_dir() == tmp_path


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_updates_one_line_on_a_terminal_and_writes_plain_lines_to_a_log():
    log = _Stream(False)
    benchmark.progress("step 1", stream=log)
    benchmark.progress("step 2", stream=log, final=True)
    assert log.getvalue() == "step 1\nstep 2\n"
    term = _Stream(True)
    benchmark.progress("a longer step 1", stream=term)
    benchmark.progress("step 2", stream=term)
    benchmark.progress_end(stream=term)
    assert term.getvalue() == "\ra longer step 1\r" + "step 2".ljust(len("a longer step 1")) + "\n"
    benchmark.progress_end(stream=term)  # nothing open: nothing written
    assert term.getvalue().count("\n") == 1


def test_a_peer_whose_package_is_missing_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("deepspeed", "yunchang") else real(name, *a))
    adapter = types.SimpleNamespace(available_deepspeed=lambda: None, available_yunchang=lambda: None)
    deepspeed = benchmark.peer_unavailable("deepspeed ulysses", adapter)
    assert "deepspeed is not installed" in deepspeed and "pip install --no-build-isolation --no-deps deepspeed" in deepspeed
    assert "pip install --no-deps yunchang" in benchmark.peer_unavailable("yunchang ulysses", adapter)
    assert "run from a clone" in benchmark.peer_unavailable("yunchang ulysses", None)


def test_tiny_main_job_shows_progress_names_skipped_peers_and_writes_stamped_json(tmp_path, capfd):
    assert benchmark.main(["--seq-len", "64", "--heads", "2", "--kv-heads", "2", "--head-dim", "8", "--repeats", "1",
                           "--warmup", "0", "--no-peers", "--linear-world-sizes", "2", "--linear-seq-len", "64",
                           "--out-dir", str(tmp_path)]) == 0
    out, err = capfd.readouterr()
    assert "\r" not in err  # a log, not a terminal: plain lines
    assert "--no-peers: skipping the peer rows torch templated ring, deepspeed ulysses, yunchang ulysses" in err
    for phase in ("starting a local world of 2 ranks", "timing [1/", "checking [1/", "P=2 timing [",
                  "P=2 checking [", "P=2 the chain alone [", "seqpar bench: done in"):
        assert phase in err, phase
    report = json.loads((tmp_path / "latest.json").read_text())
    skipped = {row["name"]: row["skipped"] for row in report["rows"] if "skipped" in row}
    assert skipped == {"torch templated ring": "--no-peers", "deepspeed ulysses": "--no-peers",
                       "yunchang ulysses": "--no-peers"}
    assert "| deepspeed ulysses | skipped: --no-peers |" in out
    assert len(list(tmp_path.glob("bench-*.json"))) == 1 and len(list(tmp_path.glob("linear-*.json"))) == 1
    assert (tmp_path / "linear.json").exists()
    assert str(tmp_path) in err


def test_main_job_adds_small_problem_rows(tmp_path, capfd):
    assert benchmark.main(["--seq-len", "64", "--heads", "2", "--kv-heads", "2", "--head-dim", "8", "--repeats", "1",
                           "--warmup", "0", "--no-peers", "--linear", "off", "--small-sizes", "32",
                           "--strategies", "ring", "--out-dir", str(tmp_path)]) == 0
    out, _ = capfd.readouterr()
    small = json.loads((tmp_path / "small-32.json").read_text())
    names = [r["name"] for r in small["rows"]]
    assert small["config"]["seq_len"] == 32 and names[1].startswith("seqpar kernel (") and names[2] == "ring"
    # every strategy row has its ratio to the single-process seqpar kernel, and that row its error
    assert small["rows"][1]["max_rel_err"] < 1e-5 and small["rows"][2]["forward_backward_vs_kernel"] > 0
    assert len(list(tmp_path.glob("small32-*.json"))) == 1
    assert "N=32" in out and "N=64" in out
