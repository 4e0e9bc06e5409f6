"""Choosing a strategy: the planner.

- `topology.py`  the machine (`Topology`, `default_topology`), the calibration cache and
                 `auto_topology` (what `strategy="auto"` plans with)
- `schedule.py`  the terms strategies write their schedule and memory in (`Problem`,
                 `Timeline`, `visible_elements`, `busiest_bytes`)
- `model.py`     the cost model: `plan`, `plan_linear`, `choose`, `choose_linear`
- `calibration.py`  `calibrate`, measured through `seqpar.comm`
- `cli.py`       `python -m seqpar plan`

Each strategy's schedule (`cost`), memory (`peak_memory`) and option values worth planning
(`candidates`) live in its own file and reach the model through its registered `Strategy`
record (`seqpar.registry`); nothing here imports a strategy file.
"""
from .topology import (DTYPE_NAMES, KINDS, LEVELS, SCHEMES, Topology, auto_topology, cache_dir, cache_path,
                       default_topology, load_calibration, steps)
from .schedule import BACKWARD_FLOPS, EXACT_RANKS, FORWARD_FLOPS, NotPlanned, Problem, Timeline, visible_elements
from .model import (TIE, TIE_PREFERENCE, Candidate, LinearCandidate, LinearPlan, Plan, best_scan_pieces, choose,
                    choose_linear, plan, plan_linear)
from .calibration import calibrate
from .cli import main

__all__ = ["Topology", "default_topology", "auto_topology", "cache_dir", "cache_path", "load_calibration", "steps",
           "KINDS", "LEVELS", "SCHEMES", "DTYPE_NAMES", "Problem", "Timeline", "NotPlanned", "visible_elements",
           "FORWARD_FLOPS", "BACKWARD_FLOPS", "EXACT_RANKS", "TIE", "TIE_PREFERENCE", "Candidate", "Plan",
           "LinearCandidate", "LinearPlan", "plan", "plan_linear", "choose", "choose_linear", "best_scan_pieces",
           "calibrate", "main"]
