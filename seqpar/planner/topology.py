"""The machine the planner models: `Topology` (links per level and kind of collective,
block-kernel rates, overlap, memory limit), `default_topology` by device type, and the
calibration cache: where `seqpar.calibrate` writes a group's measured topology
(`cache_dir`, `cache_path`) and `auto_topology`, which `strategy="auto"` plans with.
Nothing here communicates; `steps` gives a collective's sequential latency steps."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..comm.collectives import backend_of
from ..errors import brief
from ..layout import SCHEMES, group_rank_and_size

KINDS = ("p2p", "alltoall", "allgather", "reduce_scatter", "allreduce")
LEVELS = ("intra", "inter")
DTYPE_NAMES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
               "float64": torch.float64}


def steps(kind: str, ranks: int) -> int:
    """Sequential latency steps of one call of `kind` among `ranks` ranks."""
    if ranks <= 1:
        return 0
    if kind == "p2p":
        return 1
    if kind == "allreduce":
        return 2 * (ranks - 1)
    return ranks - 1


# -- the machine ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Topology:
    """What the cost model knows about the machine, per rank.

    Bandwidths are bytes per second that one rank sends; latencies are seconds per
    sequential step of a call (see `steps`). `measured` overrides a (level, kind) pair
    with a calibrated `(latency, bandwidth)`: `(("intra", "alltoall", 2e-5, 1.1e11), ...)`.
    `compute_rate` / `backward_rate`: flop/s of the block kernel's forward / backward
    (`FORWARD_FLOPS` / `BACKWARD_FLOPS` per visible score element and B H D);
    `kernel_overhead`: seconds per block call. `overlap`: the fraction of a transfer that
    hides behind compute posted with it (1: fully, 0: they serialize). `memory_limit`: bytes a rank may spend on
    attention buffers (None: no limit).
    """

    ranks_per_node: int = 1
    intra_bandwidth: float = 1.5e9
    intra_latency: float = 1e-4
    inter_bandwidth: float = 1.0e9
    inter_latency: float = 1e-4
    compute_rate: float = 3e10
    backward_rate: float = 3e10
    kernel_overhead: float = 5e-5
    overlap: float = 1.0
    measured: Tuple[Tuple[str, str, float, float], ...] = ()
    memory_limit: Optional[float] = None
    device: str = "cpu"
    source: str = "given"

    def __post_init__(self):
        if isinstance(self.ranks_per_node, bool) or not isinstance(self.ranks_per_node, int) or self.ranks_per_node < 1:
            raise ValueError(f"ranks_per_node: expected a positive int, got {self.ranks_per_node!r}")
        for name in ("intra_bandwidth", "inter_bandwidth", "compute_rate", "backward_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a positive finite number, got {brief(value)}")
        for name in ("intra_latency", "inter_latency", "kernel_overhead"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: expected a finite number >= 0, got {brief(value)}")
        if not (isinstance(self.overlap, (int, float)) and 0 <= self.overlap <= 1):
            raise ValueError(f"overlap: expected a fraction in [0, 1], got {self.overlap!r}")
        for entry in self.measured:
            if len(entry) != 4 or entry[0] not in LEVELS or entry[1] not in KINDS:
                raise ValueError(f"measured: expected (level in {LEVELS}, kind in {KINDS}, latency, bandwidth) "
                                 f"entries, got {brief(entry)}")

    def link(self, level: str, kind: str) -> Tuple[float, float]:
        """(latency per step, bandwidth) of a call of `kind` at `level`."""
        for lv, kd, latency, bandwidth in self.measured:
            if (lv, kd) == (level, kind):
                return latency, bandwidth
        if level == "intra":
            return self.intra_latency, self.intra_bandwidth
        return self.inter_latency, self.inter_bandwidth

    def transfer(self, level: str, kind: str, ranks: int, nbytes: float, calls: int = 1) -> float:
        """Seconds for `calls` calls of `kind` among `ranks` ranks sending `nbytes` in all."""
        if ranks <= 1 or calls == 0:
            return 0.0
        latency, bandwidth = self.link(level, kind)
        return calls * steps(kind, ranks) * latency + nbytes / bandwidth

    def level(self, members: Sequence[int]) -> str:
        """"intra" when all `members` (ranks) share a node, else "inter"."""
        nodes = {m // self.ranks_per_node for m in members}
        return "intra" if len(nodes) <= 1 else "inter"

    def replace(self, **changes) -> "Topology":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict:
        out = dataclasses.asdict(self)
        out["measured"] = [list(m) for m in self.measured]
        return out

    @classmethod
    def from_dict(cls, data: Dict) -> "Topology":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"topology: unknown fields {unknown}; expected some of {sorted(known)}")
        data = dict(data)
        data["measured"] = tuple(tuple(m) for m in data.get("measured", ()))
        return cls(**data)

    def describe(self) -> str:
        def rate(x):
            return f"{x / 1e9:.3g} GB/s"

        text = (f"{self.source}: {self.ranks_per_node} rank(s) per node; intra {rate(self.intra_bandwidth)}, "
                f"{self.intra_latency * 1e6:.3g} us; inter {rate(self.inter_bandwidth)}, "
                f"{self.inter_latency * 1e6:.3g} us; block kernel {self.compute_rate / 1e12:.3g} TFLOP/s fwd, "
                f"{self.backward_rate / 1e12:.3g} bwd, {self.kernel_overhead * 1e6:.3g} us/call; overlap "
                f"{self.overlap:.2g}")
        if self.measured:
            text += "; measured: " + ", ".join(
                f"{lv} {kd} {lat * 1e6:.3g} us/step {rate(bw)}" for lv, kd, lat, bw in self.measured)
        if self.memory_limit:
            text += f"; memory limit {self.memory_limit / 2**30:.3g} GiB/rank"
        return text


def _local_world_size(world_size: Optional[int]) -> Optional[int]:
    env = os.environ.get("LOCAL_WORLD_SIZE")
    if env and env.isdigit() and int(env) > 0:
        return int(env) if world_size is None else min(int(env), world_size)
    return None


def default_topology(device: str = "cpu", dtype=torch.float32, world_size: Optional[int] = None,
                     ranks_per_node: Optional[int] = None) -> Topology:
    """The topology "auto" assumes without a calibration, by device type.

    - "cpu" (gloo over loopback, one node): 1.5 GB/s and 100 us per step between ranks,
      30 GFLOP/s per rank, 50 us per block call, half of a transfer hidden behind compute
      (gloo's threads share the cores); ranks per node: `LOCAL_WORLD_SIZE`, else the world.
    - "cuda": NVLink/NVSwitch-like within a node (300 GB/s, 10 us), InfiniBand-like
      between nodes (one 400 Gb/s NIC per GPU: 40 GB/s, 25 us); block kernel 300 / 200
      TFLOP/s (fwd / bwd) for float16/bfloat16, 15 for float32 (no fused CUDA kernel),
      2 for float64; 20 us per block call; transfers fully hidden behind compute; ranks per node: `LOCAL_WORLD_SIZE`, else the
      visible GPUs, else the world.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")
    dtype = _dtype(dtype)
    local = ranks_per_node or _local_world_size(world_size)
    if device == "cpu":
        return Topology(ranks_per_node=local or world_size or 1, intra_bandwidth=1.5e9, intra_latency=1e-4,
                        inter_bandwidth=1.0e9, inter_latency=1e-4, compute_rate=3e10, backward_rate=3e10,
                        kernel_overhead=5e-5, overlap=0.5, device="cpu", source="default cpu (gloo loopback)")
    if local is None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        local = min(visible, world_size) if visible and world_size else (visible or world_size or 8)
    fwd, bwd = {torch.float16: (3e14, 2e14), torch.bfloat16: (3e14, 2e14), torch.float32: (1.5e13, 1.5e13),
                torch.float64: (2e12, 2e12)}[dtype]
    return Topology(ranks_per_node=local, intra_bandwidth=3e11, intra_latency=1e-5, inter_bandwidth=4e10,
                    inter_latency=2.5e-5, compute_rate=fwd, backward_rate=bwd, kernel_overhead=2e-5, device="cuda",
                    source="default cuda (NVLink-like intra, InfiniBand-like inter)")


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPE_NAMES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"dtype: expected one of {list(DTYPE_NAMES)} (or the torch dtype), got {dtype!r}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- the calibration cache ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where calibrations are cached: `$SEQPAR_CACHE_DIR`, else `$XDG_CACHE_HOME/seqpar`,
    else `~/.cache/seqpar`."""
    if os.environ.get("SEQPAR_CACHE_DIR"):
        return Path(os.environ["SEQPAR_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "seqpar"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def cache_path(backend: str, world_size: int, device: torch.device, dtype, hostname: Optional[str] = None) -> Path:
    """The calibration file of a group: `calibration-<backend>-p<P>-<device>-<dtype>-<host>.json`.
    Each host keeps its own file (every rank can find it without asking its peers); all
    ranks of a calibrated group write the same topology."""
    host = hostname or socket.gethostname()
    name = f"calibration-{backend}-p{world_size}-{_device_name(device)}-{_dtype_name(_dtype(dtype))}-{host}.json"
    return cache_dir() / _slug(name)


def load_calibration(path: Path) -> Optional[Topology]:
    """The Topology stored at `path`, or None when there is no readable file."""
    try:
        data = json.loads(Path(path).read_text())
        return Topology.from_dict(data["topology"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- what "auto" uses -------------------------------------------------------------------------

# (backend, world size, device, dtype) -> this host's cached calibration or None, read once
_loaded: Dict[tuple, Optional[Topology]] = {}


def auto_topology(group, device: torch.device, dtype: torch.dtype) -> Topology:
    """The topology `strategy="auto"` plans with: this group's cached calibration (see
    `cache_path`; read once per process) if there is one, else `default_topology`.
    Local only (no communication): ranks that load different files choose differently,
    and the agreement check in `seqpar.attention` then raises on every rank."""
    _, world = group_rank_and_size(group)
    backend = backend_of(group)
    if backend is not None:
        key = (backend, world, str(device), dtype)
        if key not in _loaded:
            _loaded[key] = load_calibration(cache_path(key[0], world, device, dtype))
        if _loaded[key] is not None:
            return _loaded[key]
    return default_topology(device.type if device.type in ("cpu", "cuda") else "cpu", dtype, world)

