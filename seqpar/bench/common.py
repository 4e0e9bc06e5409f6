"""What the benchmarks share: the timing of one call, progress display, output folder and
JSON files, the machine's description, the help formatter."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch


def sync(device) -> None:
    """Wait for `device`'s queued work (a no-op on CPU)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn, device=None, barrier=None) -> float:
    """Seconds one `fn()` takes on this rank: every rank starts together (`barrier`, by
    default the world's when a process group is up) with the device idle, and the clock
    stops once the device has finished. Every benchmark times its calls with this."""
    if barrier is None and torch.distributed.is_initialized():
        barrier = torch.distributed.barrier
    if barrier is not None:
        barrier()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# After a call that ran with more threads than a rank has (the single-process contestant,
# on rank 0 with every core), its OpenMP threads keep spinning for a while on the cores the
# next contestant's ranks run on. Measured on the 2-core VM, N=2048, P=2: a ring forward
# right after dense took 47 ms, otherwise 40-44 ms (PyTorch's ring core alike); 50 ms of
# rest first removed the difference.
SETTLE_S = 0.05


def settle() -> None:
    """Let the cores go idle after a call with more threads (`SETTLE_S`), outside any timing."""
    time.sleep(SETTLE_S)


def assemble(results: List[Dict], name: str, seq_dim_size: int) -> torch.Tensor:
    """The global tensor `[B, N, ...]` from every rank's `results[r][name]` at `results[r]["positions"]`."""
    first = results[0][name]
    full = first.new_empty((first.shape[0], seq_dim_size) + tuple(first.shape[2:]))
    for res in results:
        full[:, res["positions"]] = res[name]
    return full


def slowest_per_repeat(results: List[Dict], key: str) -> List[float]:
    """Per repeat, the slowest rank's time (`results[r][key]`: that rank's times)."""
    return [max(times) for times in zip(*(r[key] for r in results))]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| over the largest |want| (float64)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def machine_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def is_main() -> bool:
    """Whether this process prints: rank 0 of the world, or a lone process."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


_LIVE = {"width": 0}  # the updating line this process has open on a terminal (its width), 0 if none


def progress(text: str, *, final: bool = False, stream=None) -> None:
    """One progress step on stderr: on a terminal an updating line (`final` ends it), in a
    log (stderr not a tty) a plain line per step, never a carriage return."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        import shutil

        text = text[:max(20, shutil.get_terminal_size().columns - 1)]
        stream.write("\r" + text.ljust(_LIVE["width"]) + ("\n" if final else ""))
        _LIVE["width"] = 0 if final else len(text)
    else:
        stream.write(text + "\n")
    stream.flush()


def progress_end(stream=None) -> None:
    """End the updating line, if one is open (before other output)."""
    stream = sys.stderr if stream is None else stream
    if _LIVE["width"]:
        stream.write("\n")
        stream.flush()
        _LIVE["width"] = 0


def repo_root() -> Optional[Path]:
    """The checkout this package runs from (it has pyproject.toml and bench/), else None."""
    root = Path(__file__).resolve().parents[2]  # seqpar/bench/common.py -> the checkout
    return root if (root / "pyproject.toml").is_file() and (root / "bench").is_dir() else None


def default_out_dir() -> Path:
    """Where reports go by default: bench/out/ of the checkout, else the current directory."""
    root = repo_root()
    return root / "bench" / "out" if root is not None else Path.cwd()


def write_json(report: Dict, path: Optional[str], kind: str = "bench") -> Optional[Path]:
    """Write a bench report as JSON to a new file `KIND-YYYYmmdd-HHMMSS.json` beside `path`
    and to `path` itself (the latest run; nothing at all when `path` is empty), and say
    where. Returns the timestamped file."""
    if not path:
        return None
    latest = Path(path).resolve()
    latest.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stamped = latest.parent / f"{kind}-{stamp}.json"
    n = 2
    while stamped.exists() or stamped == latest:
        stamped = latest.parent / f"{kind}-{stamp}-{n}.json"
        n += 1
    stamped.write_text(text)
    latest.write_text(text)
    progress_end()
    print(f"results written to {stamped} (and {latest})", file=sys.stderr, flush=True)
    return stamped


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except where there is none to show (None, a plain switch)."""

    def _get_help_string(self, action):
        if action.default is None or (action.nargs == 0 and action.default is False):
            return action.help
        return super()._get_help_string(action)
