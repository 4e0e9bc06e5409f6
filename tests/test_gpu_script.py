"""bench/gpu/run.sh, the one-shot GPU check, runs its plumbing on the cpu: `--dry-run`.

The dry run is the whole script at tiny sizes (Triton's interpreter, steps that need CUDA
recorded as skipped with their reason, the steps side by side); a second run plants a
failing and a hanging step and checks that both are recorded, that the other step still
runs and that the script stops by itself.
"""
import json
import os
import shutil
import subprocess
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu", "run.sh")
STEPS = ("machine", "tests", "kernels", "merge", "ring", "memory", "compile")
STATUSES = {"ok", "partial", "skipped", "failed", "timeout"}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="run.sh needs bash and coreutils' timeout")


def _run(out, *args, env=None, limit=170):
    environ = {**os.environ, **(env or {})}
    environ.pop("OUT", None)
    environ.pop("TRITON_INTERPRET", None)  # run.sh sets it for the dry run itself
    t0 = time.monotonic()
    proc = subprocess.run(["bash", SCRIPT, "--out", str(out), *args], capture_output=True, text=True,
                          timeout=limit, env=environ, cwd=ROOT)
    return proc, time.monotonic() - t0


def _summary(out):
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return summary, {s["step"]: s for s in summary["steps"]}


def test_dry_run_lists_every_step_and_writes_parsable_json(tmp_path):
    out = tmp_path / "gpu"
    proc, wall = _run(out, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, steps = _summary(out)
    assert summary["dry_run"] is True
    assert list(steps) == list(STEPS)
    for name, step in steps.items():
        assert step["status"] in STATUSES, step
        assert step["status"] != "failed" and step["status"] != "timeout", (name, step, proc.stdout[-3000:])
        if step["status"] == "skipped":
            assert step["reason"], step
        assert (out / f"{name}.log").exists()
    # the steps that run on the cpu ran; the CUDA-only ones say why they did not
    for name in ("machine", "kernels", "merge", "ring", "compile"):
        assert steps[name]["status"] == "ok", steps[name]
    assert steps["tests"]["status"] == "skipped" and "CUDA" in steps["tests"]["reason"]
    assert steps["memory"]["status"] == "skipped" and "max_memory_allocated" in steps["memory"]["reason"]
    json_files = sorted(out.glob("*.json"))
    assert {p.stem for p in json_files} >= set(STEPS) | {"summary"}
    for path in json_files:
        with open(path) as f:
            json.load(f)  # every JSON file parses
    kernels = json.loads((out / "kernels.json").read_text())
    timed = {r["contestant"] for r in kernels["rows"] if "fwd_s" in r}
    assert {"seqpar triton", "seqpar sdpa block"} <= timed
    memory = json.loads((out / "memory.json").read_text())
    assert all(r["out_rel_err"] < 1e-5 and r["dq_rel_err"] < 1e-5 for r in memory["rows"] if "out_rel_err" in r)
    markdown = (out / "summary.md").read_text()
    for name in STEPS:
        assert f"| {name} | {steps[name]['status']}" in markdown
    with tarfile.open(out / "results.tar.gz") as tar:
        assert "./summary.json" in tar.getnames()
    print(f"dry run: {wall:.1f} s")


def test_a_failing_and_a_hanging_step_are_recorded_and_the_rest_still_runs(tmp_path):
    out = tmp_path / "gpu"
    proc, wall = _run(out, "--dry-run", "--serial", "--only", "tests,kernels,merge", "--pack",
                      "--budget", "tests=8,kernels=60,merge=60",
                      env={"SEQPAR_GPU_FAULT": "tests=hang,kernels=fail"}, limit=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary, steps = _summary(out)
    assert steps["kernels"]["status"] == "failed" and "planted" in steps["kernels"]["reason"]
    assert steps["kernels"]["rc"] == 1 and any("planted" in line for line in steps["kernels"]["log_tail"])
    assert steps["tests"]["status"] == "timeout" and steps["tests"]["rc"] in (124, 137)
    assert steps["tests"]["wall_s"] < steps["tests"]["budget_s"] + 8
    assert steps["merge"]["status"] == "ok"  # after a hang and a failure
    assert steps["machine"]["status"] == "skipped" and "--only" in steps["machine"]["reason"]
    # --pack leaves three files, the rest in the tarball
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "summary.json", "summary.md"]
    with tarfile.open(out / "results.tar.gz") as tar:
        assert {"./kernels.log", "./tests.log", "./merge.json", "./steps.tsv"} <= set(tar.getnames())
