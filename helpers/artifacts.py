"""Machine-readable results: the JSON each template writes and the next one reads.

Strict JSON: a value that is not finite (an undefined normalisation) is written as null, never NaN or
-Infinity; the result that holds it says why (see ``metrics.NormalisationCheck``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_jsonable(value: Any) -> Any:
    """Tensors/arrays -> nested lists (rounded to 6 decimals), dataclass-like objects -> dicts."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        rounded = np.round(value.astype(float), 6)
        finite = np.isfinite(rounded)
        if not finite.all():  # JSON has no NaN/inf: undefined values are null (the result says why)
            rounded = rounded.astype(object)
            rounded[~finite] = None
        return rounded.tolist()
    if isinstance(value, (np.floating, float)):
        return round(float(value), 6) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump())
    return value


def write_json(path: Path | str, data: dict) -> Path:
    """Write ``data`` as indented JSON (deterministic key order as given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: Path | str) -> dict:
    """Read a results JSON, with a clear error saying which template produces it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the template {path.stem!r} for this task and model first (make run)")
    return json.loads(path.read_text())
