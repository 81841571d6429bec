"""The search for the best pipeline within a quality budget, over the registry's declared stacks:
``optimize(pipe, reference=..., budget=..., target=...)`` and the benchmark's ``optimized`` row."""

from .api import OptimizeResult, optimize
from .budget import QualityBudget
from .costs import TARGETS
from .search import SearchResult, SearchSettings, run_search
from .space import Candidate, search_space
from .technique import optimized

__all__ = [
    "TARGETS",
    "Candidate",
    "OptimizeResult",
    "QualityBudget",
    "SearchResult",
    "SearchSettings",
    "optimize",
    "optimized",
    "run_search",
    "search_space",
]
