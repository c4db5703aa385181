"""The plans of a run, seen: dense and each exported plan sampled on the same first held-out seeds, one row
per plan, labelled with its name and what it does (``report/plans.png``).

A handful of samples per plan (:data:`GRID_SAMPLES`) keeps the cost small beside the held-out stage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib import font_manager
from PIL import Image, ImageDraw, ImageFont

from ditplan.atomic import atomic_write
from ditplan.models.family import ModelAdapter
from ditplan.plan import Plan
from ditplan.spec import ExperimentSpec
from ditplan.strategies.apply import run_plan
from ditplan.strategies.summary import DENSE, describe

GRID = "plans.png"
GRID_SAMPLES = 6
TILE = 96  # pixels per sample side (nearest-neighbour upscaling keeps small samples crisp)
PAD = 4
LABEL = 16  # pixels of the label band above each row


@dataclass(frozen=True)
class GridRow:
    """One plan's row: its name, what it does, and its samples (K, C, H, W) in [-1, 1]."""

    name: str
    what: str
    samples: torch.Tensor


def plan_rows(adapter: ModelAdapter, spec: ExperimentSpec, plans: Mapping[str, Plan],
              samples: int = GRID_SAMPLES) -> list[GridRow]:
    """Dense, then each of ``plans``, on the first ``samples`` held-out seeds (their conditions alike)."""
    _, conditions, seeds = spec.workload.seed_set("held_out", samples)
    settings = spec.sampler.settings()
    rows = [GridRow("dense", DENSE, run_plan(adapter, None, conditions, seeds, settings).samples)]
    return rows + [GridRow(name, describe(plan), run_plan(adapter, plan, conditions, seeds, settings).samples)
                   for name, plan in plans.items()]


def _tile(sample: torch.Tensor) -> Image.Image:
    """One sample (C, H, W) in [-1, 1] as an RGB tile: its first three channels, or its first as grey."""
    rgb = sample[:3] if sample.shape[0] >= 3 else sample[:1].expand(3, -1, -1)
    pixels = ((rgb.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    return Image.fromarray(pixels).resize((TILE, TILE), Image.NEAREST)


def grid_image(rows: Sequence[GridRow]) -> Image.Image:
    """The rows one under another, each under its label ``name: what``."""
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 11)  # NOTE: matplotlib ships it; it has "–"
    labels = [f"{row.name}: {row.what}" for row in rows]
    text_width = max(int(font.getlength(text)) for text in labels) + 2 * PAD
    width = max(text_width, max(len(row.samples) for row in rows) * (TILE + PAD) + PAD)
    image = Image.new("RGB", (width, len(rows) * (LABEL + TILE + PAD) + PAD), "white")
    draw = ImageDraw.Draw(image)
    for index, (row, text) in enumerate(zip(rows, labels)):
        top = PAD + index * (LABEL + TILE + PAD)
        draw.text((PAD, top + 2), text, fill="black", font=font)
        for column, sample in enumerate(row.samples):
            image.paste(_tile(sample), (PAD + column * (TILE + PAD), top + LABEL))
    return image


def write_plan_grid(adapter: ModelAdapter, spec: ExperimentSpec, plans: Mapping[str, Plan], out: Path) -> Path:
    """``plans.png`` in the folder ``out``: dense and ``plans`` on the same held-out seeds (written atomically)."""
    image = grid_image(plan_rows(adapter, spec, plans))
    return atomic_write(Path(out) / GRID, lambda tmp: image.save(tmp, format="png"))
