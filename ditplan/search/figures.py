"""Pareto-front pictures: a PNG (matplotlib) and an interactive HTML (plotly) of the first two objectives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # NOTE: no display on servers and in Ray workers
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402


def front_png(groups: dict[str, list[dict[str, Any]]], objectives: Sequence[str]) -> Any:
    """``groups``: label → rows with objective values and ``on_front``; plots objective 1 (x) vs 0 (y)."""
    x_name, y_name = objectives[1], objectives[0]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (label, rows), marker in zip(groups.items(), "os^dv"):
        xs, ys = [r[x_name] for r in rows], [r[y_name] for r in rows]
        ax.scatter(xs, ys, marker=marker, alpha=0.35, label=f"{label} (all)")
        front = sorted((r for r in rows if r.get("on_front")), key=lambda r: r[x_name])
        if front:
            ax.step([r[x_name] for r in front], [r[y_name] for r in front], where="post", marker=marker, label=f"{label} front")
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def front_html(groups: dict[str, list[dict[str, Any]]], objectives: Sequence[str]) -> Any:
    x_name, y_name = objectives[1], objectives[0]
    fig = go.Figure()
    for label, rows in groups.items():
        fig.add_trace(go.Scatter(
            x=[r[x_name] for r in rows], y=[r[y_name] for r in rows], mode="markers", name=label,
            text=[r.get("name", "") for r in rows],
            marker={"symbol": ["star" if r.get("on_front") else "circle" for r in rows], "size": 9},
        ))
    fig.update_layout(xaxis_title=x_name, yaxis_title=y_name, title="Pareto front (stars: on the front)")
    return fig
