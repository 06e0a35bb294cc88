"""The calibration table as a person reads it: one row per verdict, its worst false-positive rate, its power, its coverage.

The long table (one row per world and verdict, from :func:`core.calibration.runner.calibrate`)
is kept as it is in CSV; the summary checks each verdict against issue 27's bar: per-element
false-positive rate at most 7% and at most 10% of runs flagging any element in every null world,
power at least 80% on every planted effect, coverage at least 90% at 6 or more document blocks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FPR_ELEMENT, FPR_ANY, POWER, COVERAGE = 0.07, 0.10, 0.80, 0.90


def summary(long: pd.DataFrame, few: tuple[str, ...] = ("few_documents_3",)) -> pd.DataFrame:
    """Per verdict: worst element and any-element rate over its null worlds (and which), power per planted world, coverage.

    ``few``: worlds with too few documents for intervals: their coverage is not counted (the
    verdicts there must simply not fire).
    """
    rows = []
    for key, g in long.groupby("verdict", sort=False):
        nulls, power = g[g.role == "null"], g[g.role == "power"]
        worst = nulls.loc[nulls.element_rate.idxmax()] if len(nulls) and nulls.element_rate.notna().any() else None
        cov = g[~g.world.isin(few)].coverage
        rows.append({
            "verdict": key,
            "null worlds": len(nulls),
            "worst FPR per element": worst.element_rate if worst is not None else np.nan,
            "runs flagging any (worst)": nulls.any_rate.max() if len(nulls) else np.nan,
            "worst null world": worst.world if worst is not None else "",
            "power": "; ".join(f"{w} {p:.0%}" for w, p in zip(power.world, power.get("power", []))),
            "coverage (min)": cov.min() if cov.notna().any() else np.nan,
        })
    return pd.DataFrame(rows)


def passes(row: pd.Series) -> bool:
    """Whether one summary row meets the bar (missing numbers do not fail it: a verdict without intervals has no coverage)."""
    ok = not (row["worst FPR per element"] > FPR_ELEMENT) and not (row["runs flagging any (worst)"] > FPR_ANY)
    ok &= not (row["coverage (min)"] < COVERAGE)
    for part in filter(None, str(row["power"]).split("; ")):
        ok &= float(part.rsplit(" ", 1)[1].rstrip("%")) / 100 >= POWER
    return bool(ok)


def markdown(long: pd.DataFrame, command: str, about: str) -> str:
    """The summary and the long table as the markdown of docs/CALIBRATION.md."""
    s = summary(long)
    s["meets the bar"] = ["yes" if passes(r) else "**no**" for _, r in s.iterrows()]
    fmt = {"worst FPR per element": "{:.1%}", "runs flagging any (worst)": "{:.0%}", "coverage (min)": "{:.1%}"}
    for col, f in fmt.items():
        s[col] = [f.format(v) if pd.notna(v) else "–" for v in s[col]]
    body = long.copy()
    for col in ("element_rate", "any_rate", "power", "coverage"):
        if col in body:  # a run without planted worlds has no power column
            body[col] = [f"{v:.3f}" if pd.notna(v) else "–" for v in body[col]]
    body["tested"] = body["tested"].round(1)
    return (f"{about}\n\nReproduce: `{command}`\n\n## Every verdict against the bar\n\n{_md(s)}\n\n"
            f"## Every world and verdict\n\n{_md(body)}\n")


def _md(df: pd.DataFrame) -> str:
    """A pipe table (pandas' own needs the tabulate package)."""
    cells = [[str(c) for c in df.columns]] + [["" if (isinstance(v, float) and np.isnan(v)) else str(v) for v in row]
                                           for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join([lines[0], "|" + "---|" * len(df.columns)] + lines[1:])
