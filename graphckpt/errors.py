"""Exceptions graphckpt raises for failures the user can act on.

Bad arguments raise the builtin ``ValueError`` / ``TypeError``; everything here derives from
``GraphCkptError`` so callers can catch graphckpt's own failures in one place.
"""

from __future__ import annotations

__all__ = [
    "GraphCkptError",
    "InfeasibleBudgetError",
    "PlanAgreementTimeoutError",
    "PlanMismatchError",
    "TraceError",
    "UnsupportedWrappingError",
]


class GraphCkptError(RuntimeError):
    """Base class of graphckpt's failures the user can act on."""


class InfeasibleBudgetError(GraphCkptError):
    """No plan fits the budget; ``min_feasible_bytes`` is the smallest peak any plan reaches."""

    def __init__(self, message: str, *, min_feasible_bytes: int) -> None:
        super().__init__(message)
        self.min_feasible_bytes = min_feasible_bytes


class TraceError(GraphCkptError):
    """The model could not be captured as a graph; the message names the module and operation."""


class PlanMismatchError(GraphCkptError):
    """Ranks made different plans; the message names the ranks and the first differing layer."""


class PlanAgreementTimeoutError(GraphCkptError):
    """Some rank did not reach the plan check in time (it crashed, hung, or plans elsewhere)."""


class UnsupportedWrappingError(GraphCkptError):
    """A DDP / FSDP2 wrapping graphckpt cannot plan; the message says which orders work."""
