"""Machine-readable results: the JSON each template writes and the next one reads.

Strict JSON: a value that is not finite (an undefined normalisation) is written as null, never NaN or
-Infinity; the result that holds it says why (see ``metrics.NormalisationCheck``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def as_numpy(value: Any) -> Any:
    """A tensor as a numpy array; anything else as it is. Torch is not imported here (the runner and the report read
    and write results without it): where it was never imported, no value can be a tensor."""
    torch = sys.modules.get("torch")
    return value.detach().cpu().numpy() if torch is not None and isinstance(value, torch.Tensor) else value


DIGITS = 6  # decimals every number is written at (a normalised effect: a millionth of the clean - corrupted gap)


def to_jsonable(value: Any, digits: int | None = DIGITS) -> Any:
    """Tensors/arrays -> nested lists, numbers rounded to ``digits`` decimals (None: as they are), dataclass-like
    objects -> dicts; non-finite numbers -> None."""
    value = as_numpy(value)
    if isinstance(value, np.ndarray):
        rounded = value.astype(float) if digits is None else np.round(value.astype(float), digits)
        finite = np.isfinite(rounded)
        if not finite.all():  # JSON has no NaN/inf: undefined values are null (the result says why)
            rounded = rounded.astype(object)
            rounded[~finite] = None
        return rounded.tolist()
    if isinstance(value, (np.floating, float)):
        return (float(value) if digits is None else round(float(value), digits)) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, digits) for v in value]
    if hasattr(value, "model_dump"):
        return to_jsonable(value.model_dump(), digits)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), digits)
    return value


class NonFiniteWarning(UserWarning):
    """A results JSON holds values that were not finite (written as null); the warning names the quantities."""


def non_finite_paths(value: Any, prefix: str = "") -> dict[str, int]:
    """Key path -> number of non-finite numbers under it (tensors, arrays and floats), e.g. ``{"sweeps.head_out": 16}``."""
    value = as_numpy(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "fc":
        n = int((~np.isfinite(value)).sum())
        return {prefix or "(top level)": n} if n else {}
    if isinstance(value, (float, np.floating)):
        return {} if np.isfinite(value) else {prefix or "(top level)": 1}
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return {}
    found: dict[str, int] = {}
    for k, v in items:
        for path, n in non_finite_paths(v, f"{prefix}.{k}" if prefix else str(k)).items():
            found[path] = found.get(path, 0) + n
    return found


def write_json(path: Path | str, data: dict, digits: int | None = 6) -> Path:
    """Write ``data`` as indented strict JSON (deterministic key order as given), numbers rounded to ``digits``
    decimals (None: kept whole, e.g. edge scores far below 1e-6).

    Non-finite numbers (NaN, inf) are written as null and named in a ``NonFiniteWarning`` (key path and count),
    so an undefined quantity is never silent: the result that holds it should say why (e.g. a normalisation
    with a zero clean-corrupted gap, ``metrics.NormalisationCheck``)."""
    import warnings

    path = Path(path)
    bad = non_finite_paths(data)
    if bad:
        listed = ", ".join(f"{k} ({n})" for k, n in list(bad.items())[:8]) + (" …" if len(bad) > 8 else "")
        warnings.warn(f"{path.name}: non-finite values written as null: {listed}", NonFiniteWarning, stacklevel=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data, digits), indent=1, allow_nan=False) + "\n")
    return path


def read_json(path: Path | str) -> dict:
    """Read a results JSON, with a clear error saying which template produces it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run the template {path.stem!r} for this task and model first (make run)")
    return json.loads(path.read_text())
