"""Strict JSON for what ffablate prints and writes. JSON has no NaN or infinity (Python writes NaN and Infinity,
which other readers refuse): a NaN, a value that does not exist (a mean of no seed, an interval of one), is null; an
infinity, a value JSON cannot hold (a plugin default of inf), is the string "inf" or "-inf"."""

from __future__ import annotations

import json
import math
from typing import Any


def strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``strict(value)``; objects JSON does not know are written as their str()."""
    return json.dumps(strict(value), default=str, allow_nan=False, **kwargs)
