"""Plan: the unique (event, key) rows of the inputs, grouped by event, in input order.

What the send, record and run stages may use:
"""

from batchjob.plan._plan import Plan, Positions, build_plan

__all__ = [
    "Plan",
    "Positions",
    "build_plan",
]
