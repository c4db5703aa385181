"""Scatter pictures of plans on two metrics: a PNG (matplotlib) and an interactive HTML (plotly).

Points come in groups (a side, a source of trials); a point on a front (``on_front``) is drawn joined to
the group's other front points; with ``annotate`` every point carries its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")  # NOTE: no display on servers and in Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402

MARKERS = {"dense": ("*", "star"), "greedy": ("^", "triangle-up"), "learned": ("o", "circle"),
           "baseline": ("s", "square")}  # matplotlib, plotly
OTHER_MARKERS = (("d", "diamond"), ("v", "triangle-down"), ("P", "cross"), ("X", "x"))


@dataclass(frozen=True)
class Axes:
    """Which metric each axis shows, and the words it is labelled with."""

    x: str
    y: str
    x_label: str
    y_label: str
    title: str = ""


def _markers(groups: dict[str, list[dict[str, Any]]]) -> dict[str, tuple[str, str]]:
    others = iter(OTHER_MARKERS * len(groups))
    return {label: MARKERS.get(label) or next(others) for label in groups}


def scatter_png(groups: dict[str, list[dict[str, Any]]], axes: Axes, annotate: bool = False) -> Any:
    """``groups``: label → rows holding both metrics, ``name`` and optionally ``on_front``."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for label, rows in groups.items():
        marker = _markers(groups)[label][0]
        xs, ys = [r[axes.x] for r in rows], [r[axes.y] for r in rows]
        ax.scatter(xs, ys, marker=marker, s=80 if label == "dense" else 36, alpha=0.7, label=label)
        front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r[axes.x])
        if len(front) > 1:
            ax.step([r[axes.x] for r in front], [r[axes.y] for r in front], where="post", alpha=0.5)
        for row in rows if annotate else ():
            ax.annotate(str(row.get("name", "")), (row[axes.x], row[axes.y]), fontsize=7, alpha=0.8,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(axes.x_label)
    ax.set_ylabel(axes.y_label)
    if axes.title:
        ax.set_title(axes.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def scatter_html(groups: dict[str, list[dict[str, Any]]], axes: Axes) -> Any:
    """The same picture, interactive: hovering a point names it (and says what it does, ``what``)."""
    fig = go.Figure()
    for label, rows in groups.items():
        fig.add_trace(go.Scatter(
            x=[r[axes.x] for r in rows], y=[r[axes.y] for r in rows], mode="markers", name=label,
            text=[": ".join(str(r[k]) for k in ("name", "what") if r.get(k)) for r in rows], marker={"symbol": _markers(groups)[label][1], "size": 10},
        ))
    fig.update_layout(xaxis_title=axes.x_label, yaxis_title=axes.y_label, title=axes.title)
    return fig
