"""Figure geometry read in the browser (``viz.browser_check.FIGURE_GEOMETRY_JS``): titles whole and clear of each other."""

from __future__ import annotations


def inside(box: dict, outer: dict, slack: float = 1.0) -> bool:
    return (box["left"] >= outer["left"] - slack and box["right"] <= outer["right"] + slack
            and box["top"] >= outer["top"] - slack and box["bottom"] <= outer["bottom"] + slack)


def overlap(a: dict, b: dict) -> bool:
    return a["left"] < b["right"] and b["left"] < a["right"] and a["top"] < b["bottom"] and b["top"] < a["bottom"]


def title_problems(geometry: dict) -> list[str]:
    """Every figure whose title or axis title is cut off, or whose axis title runs over its title."""
    bad = []
    for fig_id, g in geometry.items():
        if not inside(g["title"], g["figure"]):
            bad.append(f"{fig_id}: title cut off")
        for axis in ("xtitle", "ytitle"):
            if g[axis] and not inside(g[axis], g["figure"]):
                bad.append(f"{fig_id}: {axis} cut off")
            if g[axis] and overlap(g[axis], g["title"]):
                bad.append(f"{fig_id}: {axis} overlaps the title")
    return bad
