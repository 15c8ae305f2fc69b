"""Exceptions graphckpt raises for failures the user can act on.

Bad arguments raise the builtin ``ValueError`` / ``TypeError``; everything here derives from
``GraphCkptError`` so callers can catch graphckpt's own failures in one place.
"""

from __future__ import annotations

__all__ = ["GraphCkptError", "InfeasibleBudgetError", "TraceError"]


class GraphCkptError(RuntimeError):
    """Base class of graphckpt's failures the user can act on."""


class InfeasibleBudgetError(GraphCkptError):
    """No plan fits the budget; ``min_feasible_bytes`` is the smallest peak any plan reaches."""

    def __init__(self, message: str, *, min_feasible_bytes: int) -> None:
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes


class TraceError(GraphCkptError):
    """The model could not be captured as a graph; the message names the module and operation."""
