"""torch.distributed only, no attention math: exchanges, collectives, checks, accounting."""
from .groups import set_validation
from .stats import CommStats, track

__all__ = ["CommStats", "track", "set_validation"]
