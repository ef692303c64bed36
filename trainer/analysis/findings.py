"""What the figures and both reports read off a clustering the same way: which genres set
a cluster apart (and when a cluster is too small for that to be a finding), and which
metric values are numbers to show."""

from __future__ import annotations

import math
from typing import Any

# An over-represented genre must also be common in the cluster: a lift of 5 on
# two items is noise.
_DISTINCTIVE_MIN_SHARE = 0.15
_DISTINCTIVE_MIN_LIFT = 1.2
# In a cluster this small one item moves a share by 10+ points: its lifts are no finding.
_MIN_ITEMS_FOR_LIFTS = 10
SMALL_CLUSTER_NOTE = f"under {_MIN_ITEMS_FOR_LIFTS} items: lifts are not a finding"


def lifts_are_findings(summary: dict[str, Any]) -> bool:
    return summary["size"] >= _MIN_ITEMS_FOR_LIFTS


def distinctive_genres(summary: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Up to n genres common in the cluster and over-represented there, highest lift first;
    none in a cluster too small for lifts to mean anything."""
    if not lifts_are_findings(summary):
        return []
    common = [
        g
        for g in summary["genres"]
        if g["share"] >= _DISTINCTIVE_MIN_SHARE and g["lift"] >= _DISTINCTIVE_MIN_LIFT
    ]
    return sorted(common, key=lambda g: -g["lift"])[:n]


def finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (not a bool, NaN or missing), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
