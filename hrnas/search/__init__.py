"""Resource-aware fine-grained search (HRNAS_SPEC.md section 3) on a masked ``Supernet``:
cost-normalised penalties and the rho schedule (``penalty``), the budget controller
(``controller``), BN recalibration (``recalibrate``) and the loop (``loop``)."""

from .controller import BudgetController
from .loop import SearchConfig, SearchResult, search
from .penalty import RhoSchedule, SparsityPenalty, normaliser, token_penalty
from .recalibrate import recalibrate_bn

__all__ = [
    "BudgetController",
    "RhoSchedule",
    "SearchConfig",
    "SearchResult",
    "SparsityPenalty",
    "normaliser",
    "recalibrate_bn",
    "search",
    "token_penalty",
]
