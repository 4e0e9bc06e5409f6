"""Compatibility: the planner moved to `seqpar.planner` (topology, schedule, model,
calibration, cli). This module re-exports its public names for code that imported them
from here. The values are bound once: to change the planner's `TIE` or `auto_topology`,
set them on `seqpar.planner.model` / `seqpar.planner.topology`, not here."""
from .planner import *  # noqa: F401,F403
from .planner import __all__  # noqa: F401
