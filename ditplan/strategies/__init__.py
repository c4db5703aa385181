"""Strategies and their registry. Importing this package registers the built-in strategies."""

from ditplan.strategies import (  # noqa: F401  (registers the built-in strategies)
    asc,
    ast,
    block_forecast,
    block_reuse,
    full,
    poolingformer,
    wars,
)
from ditplan.strategies.apply import apply_plan, remove_plan, run_plan
from ditplan.strategies.base import (
    STRATEGIES,
    AttentionCall,
    AttentionShape,
    Strategy,
    get_strategy_class,
    register,
)

__all__ = [
    "STRATEGIES",
    "AttentionCall",
    "AttentionShape",
    "Strategy",
    "apply_plan",
    "get_strategy_class",
    "register",
    "remove_plan",
    "run_plan",
]
