"""The steps of the one-shot GPU check (`bench/gpu/run.sh`), one process each.

    python3 bench/gpu/steps.py STEP --out DIR --budget SECONDS [--dry-run]

STEP is one of `machine tests kernels merge ring memory compile` (each writes DIR/STEP.json,
rewritten after every configuration, so a step stopped by its hard timeout keeps what it
measured) or `summary` (reads DIR/steps.tsv, every STEP.json and the logs; writes
DIR/summary.json and DIR/summary.md). `bench/gpu/README.md` says what each step measures.

A step's JSON: {"step", "status", "reason", "dry_run", "device", "config", "rows", "key",
"not_run", "elapsed_s"}; status is "ok", "partial" (its budget ran out before every
configuration ran: `not_run` lists them), "skipped" (this machine cannot run it: `reason`)
or "failed" (an exception: `reason`, the traceback is in the log). Exit code 0 unless failed.

Timing: bench/kernels.py's Timer (CUDA events, warm-up, median of the repeats, the L2
flushed before every repeat by overwriting a buffer of 4x the L2); `--dry-run` runs on
the cpu at tiny sizes with `time.perf_counter` and Triton's interpreter.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
STEPS = ("machine", "tests", "kernels", "merge", "ring", "memory", "compile")
STATUSES = ("ok", "partial", "skipped", "failed", "timeout")


# -- plumbing ---------------------------------------------------------------------------

def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


class Step:
    """One step's record, saved to DIR/NAME.json whenever it changes."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.path = os.path.join(args.out, f"{name}.json")
        self.data = {"step": name, "status": "running", "reason": None, "dry_run": args.dry_run,
                     "device": None, "started": _now(), "config": {}, "rows": [], "key": {}, "not_run": [],
                     "elapsed_s": 0.0}
        self.save()

    def save(self) -> None:
        self.data["elapsed_s"] = round(time.monotonic() - self.t0, 3)
        _write_json(self.path, self.data)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def fits(self, estimate: float, label: str, margin: float = 8.0) -> bool:
        """Whether a configuration estimated to take `estimate` s fits the budget; if not it
        is listed as not run."""
        if estimate + margin <= self.left():
            return True
        self.data["not_run"].append({"config": label, "reason": f"budget: about {estimate:.0f} s needed, "
                                                                 f"{max(0.0, self.left()):.0f} s left"})
        self.save()
        return False

    def add(self, rows: List[Dict], **config) -> None:
        for row in rows:
            self.data["rows"].append({**config, **row})
        self.save()

    def finish(self, status: Optional[str] = None, reason: Optional[str] = None) -> None:
        if status is None:
            status = "partial" if self.data["not_run"] else "ok"
        self.data["status"], self.data["reason"] = status, reason
        self.data["finished"] = _now()
        self.save()


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _bench_kernels():
    """bench/kernels.py as a module (the block, merge and ring tables and the Timer)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(ROOT, "bench", "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _device(args):
    import torch

    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        return None
    return torch.device("cuda")


NO_CUDA = "no CUDA device (torch.cuda.is_available() is False); --dry-run runs the plumbing on the cpu"


def _spread(samples: List[float]) -> Optional[float]:
    """(max - min) / median of the timed repeats."""
    if len(samples) < 2:
        return None
    return (max(samples) - min(samples)) / statistics.median(samples)


def _rel_err(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


# -- machine ----------------------------------------------------------------------------

def step_machine(step: Step, args) -> None:
    import platform

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node(),
            "torch_cuda": torch.version.cuda, "cpu_count": os.cpu_count()}
    for name in ("triton", "flash_attn", "hypothesis", "pytest", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - absent or broken: say which
            info[name] = f"not importable ({type(exc).__name__})"
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001
        info["cudnn"] = None
    try:
        from seqpar.kernels import cuda_ext

        info["seqpar._C built"] = cuda_ext.built()
    except Exception as exc:  # noqa: BLE001
        info["seqpar._C built"] = f"error: {exc}"
    info["commit"] = _git_commit()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia-smi"] = smi.stdout.strip() or smi.stderr.strip()
    except Exception as exc:  # noqa: BLE001
        info["nvidia-smi"] = f"not available ({type(exc).__name__})"
    device = _device(args)
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2 ** 20, 1))
    else:
        info["gpu"] = None
    step.data["device"] = info.get("gpu") or "cpu"
    step.data["key"] = info
    step.save()
    if device is None or device.type != "cuda":
        step.data["not_run"].append({"config": "ceilings (device copy GB/s, bf16 matmul TFLOP/s)",
                                     "reason": "needs CUDA"})
        step.finish("ok" if args.dry_run else "skipped", None if args.dry_run else NO_CUDA)
        return
    # the two ceilings the other steps' numbers are read against (METHOD.md)
    bench = _bench_kernels()
    timer = bench.Timer(device, warmup=3, repeats=10)
    gen = torch.Generator(device=device).manual_seed(0)
    src = torch.empty(2 << 30, dtype=torch.uint8, device=device).random_(generator=gen)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    rows = [{"table": "ceiling", "contestant": "device copy 2 GiB (read + write)", "s": t,
             "gb_per_s": 2 * src.numel() / t / 1e9, "spread": _spread(timer.samples)}]
    del src, dst
    a = torch.randn(8192, 8192, device=device, generator=gen, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, generator=gen, dtype=torch.bfloat16)
    t = timer(lambda: a @ b)
    rows.append({"table": "ceiling", "contestant": "bf16 matmul 8192^3 (random data)", "s": t,
                 "tflops": 2 * 8192 ** 3 / t / 1e12, "spread": _spread(timer.samples)})
    step.data["key"]["copy_gb_per_s"] = rows[0]["gb_per_s"]
    step.data["key"]["bf16_matmul_tflops"] = rows[1]["tflops"]
    step.data["key"]["l2_flush_bytes"] = timer.flush_bytes
    step.add(rows)
    step.finish()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except Exception:  # noqa: BLE001
        pass
    return os.environ.get("SEQPAR_COMMIT", "unknown (no git checkout)")


# -- tests ------------------------------------------------------------------------------

# files whose tests run on the GPU when there is one (their DEVICE is cuda then); on a cpu
# the normal suite runs them under Triton's interpreter
DEVICE_FILES = ("tests/kernels/test_triton_attention.py", "tests/kernels/test_triton_merge.py",
                "tests/kernels/test_triton_linear.py")
_OUTCOME = re.compile(r"(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)|"
                      r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\s+(\S+::\S+)")


def _pytest(step: Step, label: str, pytest_args: List[str], budget: float) -> Dict:
    """Run pytest in its own process group with a soft timeout; counts from its junit xml,
    or from its -v lines when it was stopped."""
    xml = os.path.join(tempfile.mkdtemp(prefix="seqpar-gpu-"), "junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--tb=short", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *pytest_args]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    workers = int(os.environ.get("SEQPAR_GPU_TEST_WORKERS", "6"))
    if not step.args.dry_run and workers > 0 and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(workers)]
    print(f"[tests] {label}: {' '.join(cmd)} (budget {budget:.0f} s)", flush=True)
    log_path = os.path.join(step.args.out, f"tests-{label}.part")
    t0 = time.monotonic()
    stopped = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, budget))
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    with open(log_path) as f:
        text = f.read()
    os.remove(log_path)
    print(text, flush=True)  # into tests.log
    result = {"part": label, "command": " ".join(cmd), "rc": rc, "stopped_at_budget": stopped,
              "wall_s": round(time.monotonic() - t0, 1)}
    result.update(_junit_counts(xml) if os.path.exists(xml) else _log_counts(text))
    return result


def _junit_counts(xml: str) -> Dict:
    import xml.etree.ElementTree as ET

    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, skip_reasons = [], {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            node = kinds.get("failure", kinds.get("error"))
            counts["failed" if "failure" in kinds else "errors"] += 1
            failures.append({"test": name, "message": (node.get("message") or "")[:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "")[:120]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures[:30], "skip_reasons": skip_reasons, "source": "junit"}


def _log_counts(text: str) -> Dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failures, seen = [], set()
    for match in _OUTCOME.finditer(text):
        test = match.group(1) or match.group(4)
        outcome = match.group(2) or match.group(3)
        if (test, outcome) in seen:
            continue
        seen.add((test, outcome))
        key = {"PASSED": "passed", "XPASS": "passed", "XFAIL": "skipped", "SKIPPED": "skipped",
               "FAILED": "failed", "ERROR": "errors"}[outcome]
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append({"test": test, "message": outcome})
    return {**counts, "failures": failures[:30], "skip_reasons": {}, "source": "log (pytest was stopped)"}


def step_tests(step: Step, args) -> None:
    cuda = False
    if not args.dry_run:  # the dry run hides the GPUs (run.sh): no torch import needed to know
        import torch

        cuda = torch.cuda.is_available()
    step.data["device"] = "cuda" if cuda else "cpu"
    # the dry run collects only tests/kernels (where the gpu-marked tests are today) to stay fast
    parts = [("gpu-marked", ["-m", "gpu", "tests/kernels" if args.dry_run else "tests"])]
    if cuda:
        parts.append(("device-files", ["-m", "not gpu", *DEVICE_FILES]))
    else:
        step.data["not_run"].append({"config": "device-files " + " ".join(DEVICE_FILES),
                                     "reason": "they run on CUDA only here (the normal suite runs them on "
                                               "the cpu under Triton's interpreter)"})
    step.data["config"] = {"parts": [label for label, _ in parts], "device_files": DEVICE_FILES}
    for i, (label, pytest_args) in enumerate(parts):
        # the first part leaves the second at least a third of what is left
        budget = step.left() - 5 if i == len(parts) - 1 else min(step.left() - 5, 0.6 * step.left())
        if budget < 10:
            step.data["not_run"].append({"config": label, "reason": "budget"})
            continue
        step.add([_pytest(step, label, pytest_args, budget)])
    rows = step.data["rows"]
    total = {key: sum(row.get(key, 0) for row in rows) for key in ("passed", "failed", "skipped", "errors")}
    step.data["key"] = {**total, "failures": [f["test"] for row in rows for f in row.get("failures", [])][:20]}
    stopped = any(row["stopped_at_budget"] for row in rows)
    if total["failed"] or total["errors"]:
        step.finish("failed", f"{total['failed']} failed, {total['errors']} errors")
    elif any(row["rc"] not in (0, 5) and not row["stopped_at_budget"] for row in rows):
        step.finish("failed", "pytest exited with " + ", ".join(str(row["rc"]) for row in rows))
    elif total["passed"] == 0:
        step.finish("skipped", (NO_CUDA if not cuda else "no test ran") +
                    f": {total['skipped']} GPU tests collected and skipped")
    elif stopped:
        step.data["not_run"].append({"config": "the rest of the tests", "reason": "budget"})
        step.finish("partial", "pytest stopped at its budget")
    else:
        step.finish()


# -- kernels ------------------------------------------------------------------------------

def _sizes(args, gpu, dry):
    return dry if args.dry_run else gpu


def step_kernels(step: Step, args) -> None:
    """Block kernels fwd/bwd TFLOP/s, bf16, D=64/128 (H*D=2048), N 4k-32k, causal and not."""
    device = _device(args)
    if device is None:
        return step.finish("skipped", NO_CUDA)
    bench = _bench_kernels()
    step.data["device"] = str(device)
    lens = _sizes(args, (4096, 8192, 16384, 32768), (32,))
    dims = _sizes(args, (128, 64), (16, 32))
    warmup, repeats = _sizes(args, (2, 7), (0, 1))
    step.data["config"] = {"seq_lens": lens, "head_dims": dims, "heads": "2048 // D" if not args.dry_run else 2,
                           "batch": 1, "dtype": "bfloat16" if not args.dry_run else "float32",
                           "warmup": warmup, "repeats": repeats, "contestants": list(bench.CONTESTANTS)}
    timer = bench.Timer(device, warmup, repeats)
    last = None  # (N, seconds) of the last configuration, to estimate the next one
    for n in lens:
        for d in dims:
            label = f"N={n} D={d}"
            estimate = 0.0 if last is None else last[1] * (n / last[0]) ** 2
            if not step.fits(estimate, label):
                continue
            heads = 2 if args.dry_run else 2048 // d
            kernel_args = bench.parse_args(["--device", str(device), "--seq-len", str(n), "--head-dim", str(d),
                                            "--heads", str(heads), "--kv-heads", str(1 if args.dry_run else heads),
                                            "--warmup", str(warmup), "--repeats", str(repeats)])
            t0 = time.monotonic()
            rows = bench.bench_block(kernel_args, timer)
            last = (n, time.monotonic() - t0)
            _vs_best_torch(rows)
            step.add(rows, seq_len=n, head_dim=d, heads=heads)
            print(f"[kernels] {label}: {last[1]:.1f} s", flush=True)
            bench._print(rows)
    step.data["key"] = _kernels_key(step.data["rows"])
    step.finish()


def _vs_best_torch(rows: List[Dict]) -> None:
    """Each seqpar row's time over the faster of torch's flash and cuDNN SDPA (same causal)."""
    for causal in (False, True):
        torch_rows = [r for r in rows if r["causal"] == causal and r["contestant"].startswith("torch sdpa")
                      and "fwd_s" in r]
        if not torch_rows:
            continue
        best_fwd = min(r["fwd_s"] for r in torch_rows)
        best_bwd = min(r["bwd_s"] for r in torch_rows)
        for r in rows:
            if r["causal"] == causal and r["contestant"].startswith("seqpar") and "fwd_s" in r:
                r["fwd_vs_best_torch"], r["bwd_vs_best_torch"] = r["fwd_s"] / best_fwd, r["bwd_s"] / best_bwd


def _kernels_key(rows: List[Dict]) -> Dict:
    """TFLOP/s fwd/bwd of every contestant at the largest N measured, per D and causal."""
    key = {}
    for d in sorted({r["head_dim"] for r in rows}):
        n = max(r["seq_len"] for r in rows if r["head_dim"] == d)
        for causal in (False, True):
            cell = {}
            for r in rows:
                if r["head_dim"] == d and r["seq_len"] == n and r["causal"] == causal:
                    cell[r["contestant"]] = ([round(r["fwd_tflops"], 4), round(r["bwd_tflops"], 4)]
                                             if "fwd_tflops" in r else "skipped")
            key[f"D={d} N={n} {'causal' if causal else 'full'} (TFLOP/s fwd, bwd)"] = cell
    return key


# -- merge --------------------------------------------------------------------------------

def step_merge(step: Step, args) -> None:
    device = _device(args)
    if device is None:
        return step.finish("skipped", NO_CUDA)
    bench = _bench_kernels()
    step.data["device"] = str(device)
    configs = _sizes(args, ((8192, 16, 128), (32768, 16, 128), (32768, 32, 64)), ((40, 2, 16),))
    warmup, repeats = _sizes(args, (5, 20), (0, 1))
    step.data["config"] = {"(N, H, D)": configs, "batch": 1, "out": "float32", "lse": "float64",
                           "part_out": "float32", "part_lse": "float32", "warmup": warmup, "repeats": repeats}
    timer = bench.Timer(device, warmup, repeats)
    for n, h, d in configs:
        if not step.fits(2.0, f"N={n} H={h} D={d}"):
            continue
        merge_args = bench.parse_args(["--device", str(device), "--seq-len", str(n), "--heads", str(h),
                                       "--head-dim", str(d)])
        rows = bench.bench_merge(merge_args, timer)
        step.add(rows, seq_len=n, heads=h, head_dim=d)
        bench._print(rows)
    if not step.data["rows"]:
        return step.finish()
    last = max(step.data["rows"], key=lambda r: r["seq_len"] * r["heads"] * r["head_dim"])
    step.data["key"] = {f"{r['contestant']} (N={r['seq_len']} H={r['heads']} D={r['head_dim']}) GB/s":
                        (round(r["gb_per_s"], 4) if "gb_per_s" in r else "skipped")
                        for r in step.data["rows"] if (r["seq_len"], r["heads"]) == (last["seq_len"], last["heads"])
                        and r["head_dim"] == last["head_dim"]}
    step.finish()


# -- ring ---------------------------------------------------------------------------------

def step_ring(step: Step, args) -> None:
    """bench/kernels.py's ring emulation (every rank's forward blocks and merges of a P-step
    zigzag causal ring on one GPU) against one dense causal call."""
    device = _device(args)
    if device is None:
        return step.finish("skipped", NO_CUDA)
    bench = _bench_kernels()
    step.data["device"] = str(device)
    configs = _sizes(args, ((16384, 4), (32768, 4), (32768, 8)), ((36, 3),))
    warmup, repeats = _sizes(args, (2, 7), (0, 1))
    h, d = _sizes(args, (16, 128), (2, 16))
    step.data["config"] = {"(N, P)": configs, "heads": h, "kv_heads": h, "head_dim": d, "scheme": "zigzag",
                           "causal": True, "dtype": "bfloat16" if not args.dry_run else "float32",
                           "warmup": warmup, "repeats": repeats}
    timer = bench.Timer(device, warmup, repeats)
    last = None
    for n, p in configs:
        estimate = 0.0 if last is None else last[1] * (n / last[0]) ** 2
        if not step.fits(estimate, f"N={n} P={p}"):
            continue
        ring_args = bench.parse_args(["--device", str(device), "--seq-len", str(n), "--ring-size", str(p),
                                      "--heads", str(h), "--head-dim", str(d), "--warmup", str(warmup),
                                      "--repeats", str(repeats)])
        t0 = time.monotonic()
        rows = bench.bench_ring(ring_args, timer)
        last = (n, time.monotonic() - t0)
        step.add(rows, seq_len=n, ring_size=p)
        bench._print(rows)
    step.data["key"] = {f"{r['contestant']} N={r['seq_len']}": (
        {"vs_dense": round(r["vs_dense"], 4), "max_rel_err": r["max_rel_err_vs_fp32_dense"]}
        if "vs_dense" in r else r.get("skipped", "no dense time"))
        for r in step.data["rows"] if r["contestant"].startswith("ring emulation")}
    errors = [r["max_rel_err_vs_fp32_dense"] for r in step.data["rows"] if "max_rel_err_vs_fp32_dense" in r]
    bound = 2e-2 if not args.dry_run else 1e-5
    if any(e > bound for e in errors):
        return step.finish("failed", f"ring emulation differs from dense: max rel err {max(errors):.3g} > {bound}")
    step.finish()


# -- memory -------------------------------------------------------------------------------

class _FakeRing:
    """Stands in for `seqpar.comm.p2p` under ring.py's loops for one rank of a P-rank ring
    on one device: the first receive of exchange i < P-1 is the packed K/V that rank
    r - i - 1 would send; other receives (dK/dV partials, the last hop home) are zeros.
    Sends go nowhere: the peers' memory is not this rank's."""

    def __init__(self, packed_kv, rank: int):
        self.packed, self.rank, self.calls = packed_kv, rank, 0

    def post(self, sends, recvs, group, op, record=True):
        world = len(self.packed)
        for j, (buf, _peer) in enumerate(recvs):
            if j == 0 and self.calls < world - 1:
                buf.copy_(self.packed[(self.rank - self.calls - 1) % world])
            else:
                buf.zero_()
        self.calls += 1
        return self

    def wait(self):
        return None


def _ring_analytic(layout, rank, b, h, h_kv, d, e, acc_e=4):
    """Bytes ring.py's loops must hold beyond their inputs, at their peak, for rank `rank`
    (all lengths in tokens; `e` input element size, fp32 accumulators):

    forward: out (fp32) + lse (fp64) + two K/V buffers (the one computed on and sent, the
             one being received) + one block's partial out and lse (fp32), during the loop;
             out + lse (fp64) + lse (fp32, returned) + one K/V buffer at the end.
    backward (inputs q, k, v, do, out, lse held): dq (fp32) + two K/V buffers + three fp32
             dK/dV buffers (the partial sent on, the one received, the one accumulated) +
             one block's dq, dk, dv (fp32), during the loop; dq + two dK/dV at the end."""
    from seqpar.layout import visible_blocks

    n = layout.local_len_of(rank)
    world = layout.world_size
    kv = 2 * b * n * h_kv * d
    blocks = [blk for src in range(world) for blk in visible_blocks(layout, rank, src, True)]
    max_q = max((blk.q_len for blk in blocks), default=0)
    max_k = max((blk.k_len for blk in blocks), default=0)
    out, lse64, lse32 = acc_e * b * n * h * d, 8 * b * h * n, 4 * b * h * n
    part = acc_e * b * max_q * h * d + 4 * b * h * max_q
    fwd = max(out + lse64 + 2 * kv * e + part, out + lse64 + lse32 + kv * e)
    block_grads = acc_e * b * (max_q * h * d + 2 * max_k * h_kv * d)
    bwd = max(acc_e * b * n * h * d + 2 * kv * e + 3 * kv * acc_e + block_grads,
              acc_e * b * n * h * d + 2 * kv * acc_e)
    return {"forward": fwd, "backward": bwd, "largest_block": [max_q, max_k]}


def step_memory(step: Step, args) -> None:
    """One rank of a P-step zigzag causal ring, run by ring.py's own forward and backward
    loops on one device (`_FakeRing` for the exchanges): torch.cuda.max_memory_allocated
    above the inputs, against `_ring_analytic`; the rank's output and dq against dense."""
    import torch
    import torch.nn.functional as F

    device = _device(args)
    if device is None:
        return step.finish("skipped", NO_CUDA)
    from seqpar.kernels import block
    from seqpar.layout import SeqLayout
    from seqpar.strategies import ring

    cuda = device.type == "cuda"
    step.data["device"] = str(device)
    configs = _sizes(args, ((32768, 4, 16, 16), (32768, 8, 16, 16), (32768, 4, 16, 4)), ((36, 3, 2, 1),))
    d = _sizes(args, 128, 16)
    dtype = torch.bfloat16 if cuda else torch.float32
    backends = ("sdpa", "triton")
    step.data["config"] = {"(N, P, H, H_kv)": configs, "head_dim": d, "dtype": str(dtype), "rank": 0,
                           "scheme": "zigzag", "causal": True, "backends": backends,
                           "analytic": _ring_analytic.__doc__}
    real_p2p = ring.p2p
    bound = 3e-2 if dtype == torch.bfloat16 else 1e-5
    worst = 0.0
    refs = {}  # the dense reference of the current problem
    try:
        for n, p, h, h_kv in configs:
            for backend in backends:
                label = f"N={n} P={p} H={h} H_kv={h_kv} backend={backend}"
                row = {"table": "memory", "contestant": f"ring rank 0 of P={p}, backend={backend}", "seq_len": n,
                       "ring_size": p, "heads": h, "kv_heads": h_kv, "head_dim": d}
                reason = block.unavailable_reason(backend, device, dtype, d, d ** -0.5)
                if reason:
                    step.add([{**row, "skipped": reason}])
                    continue
                if not step.fits(5.0, label):
                    continue
                gen = torch.Generator(device="cpu").manual_seed(n + p)
                q, do = (torch.randn(1, n, h, d, generator=gen).to(device, dtype) for _ in range(2))
                k, v = (torch.randn(1, n, h_kv, d, generator=gen).to(device, dtype) for _ in range(2))
                scale = d ** -0.5
                layouts = [SeqLayout.simulated(n, p, r, scheme="zigzag") for r in range(p)]
                pos = [lay.positions().to(device) for lay in layouts]
                packed = [ring._pack_kv(k[:, ps].contiguous(), v[:, ps].contiguous(), p)[0] for ps in pos]
                rq = q[:, pos[0]].contiguous()
                rk, rv = k[:, pos[0]].contiguous(), v[:, pos[0]].contiguous()
                rdo = do[:, pos[0]].contiguous()
                block.kernels(backend, rq, rk)  # the first-use check, outside the measurement
                analytic = _ring_analytic(layouts[0], 0, 1, h, h_kv, d, q.element_size())

                def forward():
                    ring.p2p = _FakeRing(packed, 0)
                    return ring._ring_forward(rq, rk, rv, layouts[0], True, scale, backend)

                def backward(out, lse):
                    ring.p2p = _FakeRing(packed, 0)
                    return ring._ring_backward(rdo, rq, rk, rv, out, lse, layouts[0], True, scale, backend)

                forward()  # warm-up (Triton compiles, cuDNN/flash handles)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                out, lse = forward()
                if cuda:
                    torch.cuda.synchronize()
                    row["fwd_peak_bytes"] = torch.cuda.max_memory_allocated() - base
                out = out.to(dtype)
                backward(out, lse)  # warm-up
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                dq, dk, dv = backward(out, lse)
                if cuda:
                    torch.cuda.synchronize()
                    row["bwd_peak_bytes"] = torch.cuda.max_memory_allocated() - base
                    row["fwd_vs_analytic"] = row["fwd_peak_bytes"] / analytic["forward"]
                    row["bwd_vs_analytic"] = row["bwd_peak_bytes"] / analytic["backward"]
                row.update(fwd_analytic_bytes=analytic["forward"], bwd_analytic_bytes=analytic["backward"],
                           largest_block=analytic["largest_block"])
                # the rank's rows of dense attention and of dense dq (dq stays local in the ring)
                # K/V repeated to H heads: enable_gqa would send fp32 to the math kernel (N x N scores)
                # (once per problem: every backend gets the same inputs)
                if (n, p, h, h_kv) not in refs:
                    qf = q.float().transpose(1, 2).detach().requires_grad_()
                    kf, vf = (t.float().repeat_interleave(h // h_kv, dim=2).transpose(1, 2) for t in (k, v))
                    dense = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale)
                    mask_do = torch.zeros(1, n, h, d, device=device)
                    mask_do[:, pos[0]] = do[:, pos[0]].float()
                    dense.backward(mask_do.transpose(1, 2))
                    refs.clear()
                    refs[(n, p, h, h_kv)] = (dense.detach().transpose(1, 2)[:, pos[0]].clone(),
                                             qf.grad.transpose(1, 2)[:, pos[0]].clone())
                    del qf, kf, vf, dense, mask_do
                want_out, want_dq = refs[(n, p, h, h_kv)]
                row["out_rel_err"] = _rel_err(out, want_out)
                row["dq_rel_err"] = _rel_err(dq, want_dq)
                worst = max(worst, row["out_rel_err"], row["dq_rel_err"])
                del out, lse, dq, dk, dv, packed
                step.add([row])
                print(f"[memory] {label}: " + ", ".join(f"{key}={val:.4g}" if isinstance(val, float) else
                                                        f"{key}={val}" for key, val in row.items()), flush=True)
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        ring.p2p = real_p2p
    rows = [r for r in step.data["rows"] if "out_rel_err" in r]
    step.data["key"] = {r["contestant"] + f" N={r['seq_len']} H_kv={r['kv_heads']}": {
        key: r[key] for key in ("fwd_vs_analytic", "bwd_vs_analytic", "out_rel_err", "dq_rel_err") if key in r}
        for r in rows}
    if worst > bound:
        return step.finish("failed", f"the emulated rank differs from dense: max rel err {worst:.3g} > {bound}")
    if not cuda:
        return step.finish("skipped", "torch.cuda.max_memory_allocated needs CUDA; the emulated ring ran on the "
                                      f"cpu and matched dense (max rel err {worst:.2g})")
    step.finish()


# -- compile ------------------------------------------------------------------------------

def _ring_call(q, k, v, layout, backend):
    import seqpar

    return seqpar.ring_attention(q, k, v, layout=layout, causal=True, backend=backend)


def step_compile(step: Step, args) -> None:
    """torch.compile of ring attention in a 1-rank world (nccl on CUDA, gloo on the cpu):
    compile time, graphs and graph breaks, eager vs compiled fwd+bwd, their difference."""
    import torch
    import torch.distributed as dist

    device = _device(args)
    if device is None:
        return step.finish("skipped", NO_CUDA)
    from seqpar.kernels import block
    from seqpar.layout import SeqLayout

    cuda = device.type == "cuda"
    step.data["device"] = str(device)
    n, h, h_kv, d = _sizes(args, (8192, 16, 16, 128), (24, 2, 1, 8))
    dtype = torch.bfloat16 if cuda else torch.float32
    compiler = "inductor" if cuda else "aot_eager"
    backends = ("sdpa", "triton") if cuda else ("sdpa",)
    warmup, repeats = _sizes(args, (2, 7), (0, 1))
    step.data["config"] = {"seq_len": n, "heads": h, "kv_heads": h_kv, "head_dim": d, "dtype": str(dtype),
                           "compiler": compiler, "backends": backends, "world": "1 rank, " +
                           ("nccl" if cuda else "gloo"), "warmup": warmup, "repeats": repeats}
    store = tempfile.mktemp(prefix="seqpar-gpu-store-")
    if cuda:
        torch.cuda.set_device(device.index or 0)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    bench = _bench_kernels()
    timer = bench.Timer(device, warmup, repeats)
    try:
        layout = SeqLayout(n)
        gen = torch.Generator(device="cpu").manual_seed(3)
        q, do = (torch.randn(1, n, h, d, generator=gen).to(device, dtype) for _ in range(2))
        k, v = (torch.randn(1, n, h_kv, d, generator=gen).to(device, dtype) for _ in range(2))
        for backend in backends:
            row = {"table": "compile", "contestant": f"ring_attention backend={backend}", "compiler": compiler}
            reason = block.unavailable_reason(backend, device, dtype, d, d ** -0.5)
            if reason:
                step.add([{**row, "skipped": reason}])
                continue
            if not step.fits(30.0 if cuda else 5.0, backend):
                continue
            torch._dynamo.reset()
            from torch._dynamo.utils import counters

            counters.clear()
            graphs = []

            def recording(gm, example_inputs):
                graphs.append(len(gm.graph.nodes))
                return torch._dynamo.lookup_backend(compiler)(gm, example_inputs)

            compiled_fn = torch.compile(_ring_call, backend=recording)

            def run(fn):
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                out = fn(*leaves, layout, backend)
                out.backward(do)
                return [out.detach()] + [t.grad for t in leaves]

            want = run(_ring_call)
            t0 = time.monotonic()
            got = run(compiled_fn)
            if cuda:
                torch.cuda.synchronize()
            row["first_call_s"] = time.monotonic() - t0
            row["graphs"] = len(graphs)
            row["graph_nodes"] = graphs
            row["graph_breaks"] = sum(counters["graph_break"].values())
            row["graph_break_reasons"] = sorted(counters["graph_break"])[:10]
            row["max_rel_diff"] = max(_rel_err(b, a) for a, b in zip(want, got))
            row["eager_fwd_bwd_s"] = timer(lambda: run(_ring_call))
            row["compiled_fwd_bwd_s"] = timer(lambda: run(compiled_fn))
            row["compiled_vs_eager"] = row["compiled_fwd_bwd_s"] / row["eager_fwd_bwd_s"]
            step.add([row])
            print(f"[compile] {row}", flush=True)
    finally:
        dist.destroy_process_group()
        if os.path.exists(store):
            os.remove(store)
    rows = [r for r in step.data["rows"] if "max_rel_diff" in r]
    step.data["key"] = {r["contestant"]: {key: r[key] for key in ("first_call_s", "graphs", "graph_breaks", "max_rel_diff",
                                                      "compiled_vs_eager")} for r in rows}
    # aot_eager runs the same kernels as eager; inductor may fuse the casts around the ops
    bound = 2e-2 if cuda else 1e-6
    bad = [r for r in rows if r["max_rel_diff"] > bound]
    if bad:
        return step.finish("failed", f"compiled differs from eager: {bad[0]['contestant']} "
                                     f"max rel diff {bad[0]['max_rel_diff']:.3g} > {bound}")
    step.finish()


# -- summary ------------------------------------------------------------------------------

def _tail(path: str, lines: int = 25) -> List[str]:
    try:
        with open(path, errors="replace") as f:
            return [line.rstrip("\n") for line in f.readlines()[-lines:]]
    except OSError:
        return []


def summarize(out: str) -> Dict:
    """summary.json and summary.md from steps.tsv (name, exit code, wall s, budget s), the
    steps' JSON files and their logs."""
    runs = {}
    tsv = os.path.join(out, "steps.tsv")
    if os.path.exists(tsv):
        with open(tsv) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4:
                    runs[parts[0]] = {"rc": int(parts[1]), "wall_s": float(parts[2]), "budget_s": float(parts[3]),
                                      "note": parts[4] if len(parts) > 4 else ""}
    steps, machine, dry, rows = [], {}, None, {}
    for name in STEPS:
        run = runs.get(name)
        data = None
        path = os.path.join(out, f"{name}.json")
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            pass
        entry = {"step": name, "json": f"{name}.json" if data else None, "log": f"{name}.log"}
        if run is None:
            entry.update(status="skipped", reason="not run (not in --only)")
        else:
            entry.update(rc=run["rc"], wall_s=run["wall_s"], budget_s=run["budget_s"])
            if run["note"]:
                entry.update(status="skipped", reason=run["note"])
            elif run["rc"] in (124, 137):
                entry.update(status="timeout", reason=f"stopped by its hard timeout ({run['budget_s']:.0f} s)"
                             + ("; the rows measured before are kept" if data and data.get("rows") else ""))
            elif data is None:
                entry.update(status="failed", reason=f"exit code {run['rc']}, no {name}.json")
            elif run["rc"] != 0 and data.get("status") != "failed":
                entry.update(status="failed", reason=f"exit code {run['rc']}" + (
                    f" (its JSON said {data.get('status')})" if data.get("status") else ""))
            else:
                entry.update(status=data.get("status"), reason=data.get("reason"))
        if data:
            rows[name] = data.get("rows", [])
            entry["key"] = data.get("key", {})
            entry["headline"] = _headline(name, entry["key"])
            entry["not_run"] = data.get("not_run", [])
            entry["device"] = data.get("device")
            dry = data.get("dry_run") if dry is None else dry
            if name == "machine":
                machine = data.get("key", {})
        if entry["status"] in ("failed", "timeout"):
            entry["log_tail"] = _tail(os.path.join(out, f"{name}.log"))
        if entry["status"] not in STATUSES:
            entry["status"] = "failed"
            entry["reason"] = f"unknown status in {name}.json ({entry['status']!r})"
        steps.append(entry)
    summary = {"created": _now(), "dry_run": dry, "out": os.path.abspath(out), "machine": machine,
               "total_wall_s": round(sum(r["wall_s"] for r in runs.values()), 1), "steps": steps}
    _write_json(os.path.join(out, "summary.json"), summary)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(_markdown(summary, rows))
    return summary


def _fmt(val) -> str:
    if isinstance(val, float):
        return f"{val:.4g}"
    if isinstance(val, (list, tuple)):
        return "/".join(_fmt(x) for x in val)
    if isinstance(val, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in val.items())
    return "-" if val is None else str(val)


def _mib(val) -> str:
    return "-" if val is None else f"{val / 2 ** 20:.1f}"


# per step: the detail table's (header, cell of a row) columns; rows with "skipped" are listed apart
_DETAILS = {
    "machine": [("ceiling", lambda r: r["contestant"]), ("ms", lambda r: _fmt(r["s"] * 1e3)),
                ("GB/s or TFLOP/s", lambda r: _fmt(r.get("gb_per_s", r.get("tflops")))),
                ("spread", lambda r: _fmt(r.get("spread")))],
    "tests": [("part", lambda r: r["part"]), ("passed", lambda r: r["passed"]), ("failed", lambda r: r["failed"]),
              ("errors", lambda r: r["errors"]), ("skipped", lambda r: r["skipped"]),
              ("s", lambda r: _fmt(r["wall_s"])), ("stopped at budget", lambda r: r["stopped_at_budget"]),
              ("skip reasons", lambda r: _fmt(r.get("skip_reasons")))],
    "kernels": [("D", lambda r: r["head_dim"]), ("H", lambda r: r["heads"]), ("N", lambda r: r["seq_len"]),
                ("causal", lambda r: r["causal"]), ("contestant", lambda r: r["contestant"]),
                ("fwd ms", lambda r: _fmt(r["fwd_s"] * 1e3)), ("bwd ms", lambda r: _fmt(r["bwd_s"] * 1e3)),
                ("fwd TFLOP/s", lambda r: _fmt(r["fwd_tflops"])), ("bwd TFLOP/s", lambda r: _fmt(r["bwd_tflops"])),
                ("fwd, bwd time / best torch", lambda r: _fmt((r["fwd_vs_best_torch"], r["bwd_vs_best_torch"]))
                 if "fwd_vs_best_torch" in r else "-")],
    "merge": [("N", lambda r: r["seq_len"]), ("H", lambda r: r["heads"]), ("D", lambda r: r["head_dim"]),
              ("contestant", lambda r: r["contestant"]), ("ms", lambda r: _fmt(r["s"] * 1e3)),
              ("GB/s", lambda r: _fmt(r["gb_per_s"]))],
    "ring": [("N", lambda r: r["seq_len"]), ("P", lambda r: r["ring_size"]), ("contestant", lambda r: r["contestant"]),
             ("ms", lambda r: _fmt(r["s"] * 1e3)), ("TFLOP/s", lambda r: _fmt(r.get("tflops"))),
             ("time / dense", lambda r: _fmt(r.get("vs_dense"))),
             ("max rel err vs fp32 dense", lambda r: _fmt(r.get("max_rel_err_vs_fp32_dense")))],
    "memory": [("N", lambda r: r["seq_len"]), ("P", lambda r: r["ring_size"]),
               ("H/H_kv", lambda r: f"{r['heads']}/{r['kv_heads']}"), ("contestant", lambda r: r["contestant"]),
               ("fwd peak / analytic MiB", lambda r: f"{_mib(r.get('fwd_peak_bytes'))} / {_mib(r['fwd_analytic_bytes'])}"),
               ("ratio", lambda r: _fmt(r.get("fwd_vs_analytic"))),
               ("bwd peak / analytic MiB", lambda r: f"{_mib(r.get('bwd_peak_bytes'))} / {_mib(r['bwd_analytic_bytes'])}"),
               ("ratio ", lambda r: _fmt(r.get("bwd_vs_analytic"))),
               ("out, dq rel err", lambda r: _fmt((r["out_rel_err"], r["dq_rel_err"])))],
    "compile": [("contestant", lambda r: r["contestant"]), ("compiler", lambda r: r["compiler"]),
                ("first call s", lambda r: _fmt(r["first_call_s"])), ("graphs", lambda r: r["graphs"]),
                ("graph breaks", lambda r: r["graph_breaks"]), ("eager ms", lambda r: _fmt(r["eager_fwd_bwd_s"] * 1e3)),
                ("compiled ms", lambda r: _fmt(r["compiled_fwd_bwd_s"] * 1e3)),
                ("compiled / eager", lambda r: _fmt(r["compiled_vs_eager"])),
                ("max rel diff", lambda r: _fmt(r["max_rel_diff"]))],
}


def _detail(name: str, rows: List[Dict]) -> List[str]:
    columns = _DETAILS[name]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    skipped = {}
    for row in rows:
        if isinstance(row.get("skipped"), str):
            skipped.setdefault(f"{row.get('contestant', '?')}: {row['skipped']}", None)
            continue
        try:
            lines.append("| " + " | ".join(str(cell(row)).replace("|", "/") for _, cell in columns) + " |")
        except (KeyError, TypeError, ValueError) as exc:
            lines.append(f"| (row not shown: {type(exc).__name__} {exc}) |")
    if len(lines) == 2:
        lines = []
    return lines + [f"- skipped: {text}" for text in skipped]


def _markdown(summary: Dict, rows: Dict[str, List[Dict]]) -> str:
    m = summary["machine"]
    lines = [f"# seqpar GPU check{' (dry run, cpu)' if summary['dry_run'] else ''}: {summary['created']}", "",
             f"Machine: {m.get('gpu') or 'cpu'}; nvidia-smi: {m.get('nvidia-smi', '?')}; torch {m.get('torch', '?')} "
             f"(CUDA {m.get('torch_cuda')}, cuDNN {m.get('cudnn')}); triton {m.get('triton', '?')}; "
             f"flash-attn {m.get('flash_attn', '?')}; python {m.get('python', '?')}; "
             f"seqpar commit {m.get('commit', '?')}; seqpar._C built: {m.get('seqpar._C built', '?')}.",
             f"Ceilings: device copy {_fmt(m.get('copy_gb_per_s'))} GB/s, bf16 matmul "
             f"{_fmt(m.get('bf16_matmul_tflops'))} TFLOP/s. Step times add up to {summary['total_wall_s']} s"
             f"{' (the dry run runs them side by side)' if summary['dry_run'] else ''}.", "",
             "| step | status | s (budget) | key numbers |", "|---|---|---|---|"]
    for s in summary["steps"]:
        reason = f" ({s['reason']})" if s.get("reason") else ""
        wall = f"{s['wall_s']:.0f} ({s['budget_s']:.0f})" if "wall_s" in s else "-"
        lines.append(f"| {s['step']} | {s['status']}{reason} | {wall} | {s.get('headline', '')} |".replace("\n", " "))
    for s in summary["steps"]:
        body = _detail(s["step"], rows.get(s["step"], []))
        not_run = [f"- not run: {x['config']} ({x['reason']})" for x in s.get("not_run", [])]
        failures = [f"- failed: {name}" for name in s.get("key", {}).get("failures", [])] if s["step"] == "tests" else []
        tail = [f"Last lines of {s['log']}:", "", "```", *s["log_tail"], "```"] if s.get("log_tail") else []
        if body or not_run or failures or tail:
            lines += ["", f"## {s['step']}: {s['status']}", "", *body, *failures, *not_run, *tail]
    return "\n".join(lines) + "\n"


def _headline(name: str, key: Dict) -> str:
    """The key numbers of a step in one line."""
    if name == "tests":
        return ", ".join(f"{key[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if k in key)
    if name == "machine":
        return ""
    parts = []
    for label, val in key.items():
        if name == "kernels" and isinstance(val, dict):
            val = {c: v for c, v in val.items() if c in ("seqpar triton", "seqpar sdpa block", "torch sdpa flash")}
        parts.append(f"{label}: {_fmt(val)}")
    return "; ".join(parts)


# -- main ---------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=STEPS + ("summary",))
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget", type=float, default=120.0, help="seconds this step may take")
    parser.add_argument("--dry-run", action="store_true", help="cpu, tiny sizes, Triton's interpreter")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.step == "summary":
        summarize(args.out)
        return 0
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports a Triton kernel
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    step = Step(args.step, args)
    # for the tests of run.sh's plumbing: SEQPAR_GPU_FAULT="kernels=fail,ring=hang"
    fault = dict(item.split("=", 1) for item in os.environ.get("SEQPAR_GPU_FAULT", "").split(",") if "=" in item)
    try:
        if fault.get(args.step) == "hang":
            print(f"[{args.step}] SEQPAR_GPU_FAULT: hanging", flush=True)
            time.sleep(10 ** 6)
        if fault.get(args.step) == "fail":
            raise RuntimeError("SEQPAR_GPU_FAULT: a planted failure")
        globals()[f"step_{args.step}"](step, args)
    except Exception as exc:  # noqa: BLE001 - recorded, and the next step still runs
        traceback.print_exc()
        step.finish("failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    print(f"[{args.step}] {step.data['status']}" + (f": {step.data['reason']}" if step.data["reason"] else ""),
          flush=True)
    return 1 if step.data["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
