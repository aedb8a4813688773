"""The table of runs that sweeps write and fits read: one row per trained model (and their training curves,
curves.json, for approach 1).

Columns: N (parameters), D (training tokens), loss (final validation loss); optional C (training FLOPs,
6ND when absent) and budget (the FLOP budget a run was planned for, which groups IsoFLOP curves; when absent,
runs whose C lie within a factor BUDGET_SPREAD share one, `infer_budgets`). Files
are CSV or JSON (a list of row objects, or {"runs": [...]}). Every fit validates the table first: missing
columns, CSV rows with more values than the header, non-positive or non-finite values and too few rows are
reported by name, never fitted.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from lmforge.errors import ConfigError, DataError
from lmforge.utils import atomic_path, write_json_atomic

REQUIRED = ("N", "D", "loss")
BUDGET_SPREAD = 1.2
"""without a budget column, runs whose C lie within this factor of their group's smallest share one budget. A run
planned for budget C trains round(C / (6 N tokens_per_step)) steps, so its 6ND lies within 1/(2 steps) of C:
±2.5% at the sweep's min_steps = 20, ±10% at 5 steps; IsoFLOP budgets lie further apart (Chinchilla's >= 1.67x,
the sweep's default 3.3x)"""


@dataclass(frozen=True)
class Runs:
    """Column arrays of a validated run table (all float64, all > 0)."""

    n: np.ndarray
    d: np.ndarray
    loss: np.ndarray
    c: np.ndarray
    budget: np.ndarray

    def __len__(self) -> int:
        return len(self.loss)

    def take(self, idx: np.ndarray) -> "Runs":
        return Runs(self.n[idx], self.d[idx], self.loss[idx], self.c[idx], self.budget[idx])


def _column(rows: list[dict], name: str) -> np.ndarray | None:
    """Column `name` as float64 (all finite and > 0), or None when no row has a value in it. A column with values
    in some rows only is refused, naming the first empty row: an unfinished run's blank loss is no missing column,
    and a C or budget given for some runs must not be replaced by 6ND for all of them."""
    filled = [r.get(name) not in ("", None) for r in rows]
    if not any(filled):
        return None
    if not all(filled):
        i = filled.index(False)
        leave_out = "" if name in REQUIRED else f", or leave {name!r} out of every row"
        raise DataError(f"column {name!r} is empty in row {i} ({ {k: v for k, v in rows[i].items() if k} }): fill "
                        f"it in or remove the row{leave_out}")
    flag = next((i for i, r in enumerate(rows) if isinstance(r[name], bool)), None)
    if flag is not None:  # float(true) is 1.0: a JSON true/false is no count or loss
        raise DataError(f"column {name!r} must be numeric; row {flag} has {rows[flag][name]!r}")
    try:
        out = np.array([float(r[name]) for r in rows], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"column {name!r} has a non-numeric value: {e}") from e
    bad = ~np.isfinite(out) | (out <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"column {name!r} must be finite and > 0; row {i} has {float(out[i])}")
    return out


def runs_from_rows(rows: Iterable[dict[str, Any]]) -> Runs:
    rows = list(rows)
    if not rows:
        raise DataError("the run table is empty")
    missing = [c for c in REQUIRED if all(r.get(c) in ("", None) for r in rows)]
    if missing:
        # a ';'-separated CSV reads as one column named 'N;D;loss'; None keys hold a row's extra values
        found = list(dict.fromkeys(k for r in rows for k in r if k is not None))
        raise ConfigError(f"the run table lacks column(s) {missing}; need {list(REQUIRED)} (C, budget optional; "
                          f"names are case-sensitive, the CSV comma-separated), found {found}")
    n, d, loss = (_column(rows, c) for c in REQUIRED)
    c = _column(rows, "C")
    c = 6.0 * n * d if c is None else c
    budget = _column(rows, "budget")
    if len(rows) < 2:  # every fit skipped, each with its own reason, and an empty fit.json written with exit 0
        raise DataError("the run table holds 1 run: a scaling law needs runs at several sizes and budgets (L(C): 2 "
                        "budgets; approach 2: 3 sizes at each of 2 budgets; approach 3: 6 runs); train more first")
    return Runs(n, d, loss, c, infer_budgets(c) if budget is None else budget)


def infer_budgets(c: np.ndarray) -> np.ndarray:
    """The budget each run was planned for, from its FLOPs C alone: the runs in order of C, a group taking each
    run within BUDGET_SPREAD of its smallest, and each group's budget its C's geometric mean to 9 significant
    digits. Grouped by C itself, the steps' rounding (and 6·N·D's last bits, 1e18 vs 9.999999999999999e17) made
    every run of one budget a budget of its own: a one-budget table passed approach 3's check for 2 budgets,
    which cannot tell the N and D terms apart on it, and approach 2 found no curve of 3 sizes."""
    order = np.argsort(c, kind="stable")
    budget, start = np.empty_like(c), 0
    for i in range(1, len(c) + 1):
        if i == len(c) or c[order[i]] > c[order[start]] * BUDGET_SPREAD:
            group = order[start:i]
            budget[group] = float(f"{np.exp(np.log(c[group]).mean()):.9g}")
            start = i
    return budget


def read_json(path: str | Path, form: str) -> Any:
    """The parsed JSON file at `path`, or a DataError naming it and `form`, what it should hold."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as e:  # JSONDecodeError (a truncated file), or bytes that are not UTF-8
        raise DataError(f"{path} is not valid JSON ({e}); it should hold {form}") from e


def load_runs(path: str | Path) -> Runs:
    path = Path(path)
    if not path.is_file():
        inside = f": give {path / 'runs.csv'}" if (path / "runs.csv").is_file() else ""
        raise DataError(f"run table {path} is a directory, not a .csv or .json file{inside}" if path.is_dir()
                        else f"run table not found: {path}")
    if path.suffix == ".json":
        form = 'a list of run objects ({"N": ..., "D": ..., "loss": ...}) or {"runs": [...]}'
        data = read_json(path, form)
        rows = data.get("runs") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise DataError(f"{path} is not a run table: it should hold {form}")
    else:
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:  # a spreadsheet's byte-order mark is no column
                rows = list(csv.DictReader(f))
        except (UnicodeDecodeError, csv.Error) as e:  # a UTF-16 export, a binary file given by mistake
            raise DataError(f"{path} is not a UTF-8 CSV file ({e}); save the run table as CSV (UTF-8) or JSON, "
                            f"with columns {', '.join(REQUIRED)}") from e
        # csv.DictReader files a row's values beyond the header under the key None: a header one column short
        # (N,D,loss over rows of N,D,C,loss) read C as the loss and fitted it (empty ones, trailing commas, are none)
        extra = next((i for i, r in enumerate(rows) if any(v.strip() for v in r.get(None) or ())), None)
        if extra is not None:
            header = [k for k in rows[extra] if k is not None]
            raise DataError(f"{path}: row {extra} has more values than the header's columns {header} (extra: "
                            f"{rows[extra][None]}): name every column in the header (N, D, loss[, C, budget])")
    return runs_from_rows(rows)


def load_curves(path: str | Path) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """Training curves for approach 1 from curves.json (written by the sweep): (N, tokens, loss) per run that
    has at least 2 evaluations."""
    form = 'a list of {"N": parameters, "curve": [[tokens, loss], ...]} (one per run)'
    curves = []
    try:
        for c in read_json(path, form):
            n, pts = float(c["N"]), np.array(c["curve"], dtype=np.float64)  # (evaluations, 2)
            if len(pts) and pts.shape[1:] != (2,):
                raise ValueError(f"curve of shape {pts.shape}")
            if len(pts) >= 2:
                curves.append((n, pts[:, 0], pts[:, 1]))
    except (TypeError, KeyError, IndexError, ValueError) as e:
        raise DataError(f"{path} is not a curves file ({type(e).__name__}: {e}); it should hold {form}") from e
    return curves


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as CSV (.csv) or JSON (anything else); columns are the union of the rows' keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        cols = list(dict.fromkeys(k for r in rows for k in r))
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    else:
        write_json_atomic(path, {"runs": rows})
    return path
