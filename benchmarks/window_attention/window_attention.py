"""Window attention benchmark: latency ratio vs FLOPs ratio against dense, per window shape.

Part 1: the attention core alone, window ±N/8 (blocks and tiles at their derived layouts, about as
many keys), and blocks at other block sizes, at 256, 1024 and 4096 tokens; the 1-D blocks both through
strided K/V views and through gathered copies.
Part 2: the whole embedded-sized DiT transformer (6 layers, 4 heads × 32, random weights) at the same
token counts, every layer running ``wars`` at a reuse step, against the dense transformer; FLOPs
counted by ``torch.utils.flop_counter`` on one forward of each.
Goal: latency ratio ≤ 1.3 × FLOPs ratio at ≥ 1,024 tokens. Timings: one process, every config and
dense interleaved in each round, ratios per round, median (min–max) of ``--repeats`` after a warm-up.
Part 3 (``--parts quality``): WA-RS on the embedded model, every shape at the same window size (nearly equal
FLOPs), fidelity of the final samples to dense on 20 seeds (1000–1019); fixed plans, no calibration.
Part 5 (``--parts anatomy``): where a block window's time goes at 1,024 tokens, ±N/16 and ±N/8 (default
blocks): the strided kernel, the fused SDPA kernel on contiguous copies of the blocks (the copies made
beforehand, not timed), the two GEMMs and the softmax of an explicit bmm → softmax → bmm alone, that
composition eager and through ``torch.compile``; all as ratios to dense in the same rounds.
Part 4 (``--dit-xl``, meant for a GPU in bfloat16): one DiT-XL-sized self-attention module (1152
wide, 16 heads) under each DiTFastAttn strategy, as % of dense, next to DiTFastAttn's Table 2.

    python benchmarks/window_attention/window_attention.py [--repeats 20] [--parts core,transformer,quality]
    python benchmarks/window_attention/window_attention.py --device cuda --dtype bfloat16 --dit-xl
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import print_provenance, ratio_stats  # noqa: E402
from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ditplan.evaluators.cost import interleaved_times, plan_flops  # noqa: E402
from ditplan.evaluators.fidelity import psnr, relative_l1  # noqa: E402
from ditplan.models.adapters import load_adapter  # noqa: E402
from ditplan.models.context import StepContext  # noqa: E402
from ditplan.models.sampling import plan_target  # noqa: E402
from ditplan.plan import Plan  # noqa: E402
from ditplan.spec import SamplerSettings  # noqa: E402
from ditplan.strategies import AttentionCall, AttentionShape, get_strategy_class  # noqa: E402
from ditplan.strategies.apply import run_plan  # noqa: E402
from ditplan.strategies.attention import (  # noqa: E402
    dense_attention,
    window_attention,
    window_layout,
)

# DiTFastAttn Table 2, "Attn Latency" (and "Attn FLOPs") as % of dense, A100.
PAPER = {
    1024: {"asc": (59, 50), "wars": (85, 77), "wars+asc": (51, 38), "ast": (4, 0)},
    4096: {"asc": (54, 50), "wars": (54, 51), "wars+asc": (31, 26), "ast": (3, 0)},
}
TOKENS = (256, 1024, 4096)
SHAPES = ("band", "blocks", "tiles")


def ratio_cells(times: dict[str, list[float]], name: str) -> tuple[str, float]:
    """Median (min–max) over rounds of this config's time / dense's time in the same round."""
    median, low, high = ratio_stats(times, name)
    return f"{median:.3f} ({low:.3f}–{high:.3f})", median


def timed_ratios(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    for run in runs.values():  # warm-up (and flex/torch.compile builds)
        run()
    return interleaved_times(runs, device, repeats)


def core_table(device: torch.device, dtype: torch.dtype, repeats: int, batch: int, heads: int, head_dim: int,
               calls: int = 1) -> None:
    print(f"\nwindow attention core vs dense: batch {batch}, {heads} heads × {head_dim}, {device}, {dtype}, "
          f"{repeats} interleaved rounds of {calls} call(s) per config, torch threads {torch.get_num_threads()}")
    print("| tokens | window | layout | implementation | FLOPs ratio | latency ratio, median (min–max) | latency / FLOPs |")
    print("|---|---|---|---|---|---|---|")
    band = "flex" if device.type == "cuda" else "banded"
    # (shape, window = N / divisor, implementation, block: None derived, "wide" :func:`wide_block`,
    # "diagonal" 2w: no halo, the largest query blocks a ±w run allows — what the kernel's query split allows)
    variants = [("band", 8, band, None), ("blocks", 8, "strided", None), ("blocks", 8, "strided", "wide"),
                ("blocks", 8, "strided", "diagonal"),
                ("blocks", 8, "gather", None), ("tiles", 8, "gather", None), ("band", 16, band, None),
                ("blocks", 16, "strided", None), ("blocks", 16, "strided", "wide"), ("band", 4, band, None),
                ("blocks", 4, "strided", None), ("blocks", 4, "strided", "wide")]
    for tokens in TOKENS:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        layouts = {}  # one row per distinct (layout, implementation)
        for shape, divisor, impl, block in variants:
            window = tokens // divisor
            size = {None: None, "wide": wide_block(window), "diagonal": 2 * window}[block]
            layout = window_layout(shape, tokens, window, size)
            layouts[f"{describe(layout)}/{impl}"] = (layout, impl)
        runs = {"dense": lambda: [dense_attention(q, k, v) for _ in range(calls)]}
        runs |= {name: (lambda l=l, i=i: [window_attention(q, k, v, l, i) for _ in range(calls)])
                 for name, (l, i) in layouts.items()}
        times = timed_ratios(runs, device, repeats)
        for name, (layout, impl) in layouts.items():
            flops = layout.pairs() / tokens**2
            cells, median = ratio_cells(times, name)
            print(f"| {tokens} | ±{layout.window} | {describe(layout)} | {impl} | {flops:.3f} | {cells} | "
                  f"{median / flops:.2f} |", flush=True)


def wide_block(window: int) -> int:
    """Blocks of three quarters of a ±``window`` run (a multiple of 16; the halo an eighth of it each side),
    which need not divide N: larger query blocks than the default's half, for the fused kernels."""
    return max(1, (3 * (2 * window + 1) // 4) // 16 * 16)


def describe(layout) -> str:
    if layout.shape == "band":
        return f"band ±{layout.window}"
    if layout.shape == "blocks":
        return f"blocks of {layout.block} + halo {layout.halo}"
    return f"tiles {layout.block}² + halo {layout.halo}"


def anatomy_table(device: torch.device, dtype: torch.dtype, repeats: int, calls: int, batch: int, heads: int,
                  head_dim: int) -> None:
    tokens = 1024
    print(f"\nwhere a block window's time goes, {tokens} tokens, batch {batch}, {heads} heads × {head_dim}, {device}, "
          f"{dtype}, {repeats} interleaved rounds of {calls} call(s), torch threads {torch.get_num_threads()}")
    print("| window | layout | part | the window's FLOPs ratio | latency ratio, median (min–max) | latency / the window's FLOPs |")
    print("|---|---|---|---|---|---|")
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    for divisor in (16, 8):
        layout = window_layout("blocks", tokens, tokens // divisor)
        queries, keys = layout.groups()  # (G, b), (G, span): contiguous copies of every block
        qg, kg, vg = (t[:, :, index].flatten(0, 2).contiguous() for t, index in ((q, queries), (k, keys), (v, keys)))
        scores = torch.bmm(qg, kg.transpose(1, 2))

        def composed(qg: torch.Tensor, kg: torch.Tensor, vg: torch.Tensor) -> torch.Tensor:
            return torch.bmm((torch.bmm(qg, kg.transpose(1, 2)) * head_dim**-0.5).softmax(-1), vg)

        compiled = torch.compile(composed, dynamic=False)  # the shapes of this window only
        parts = {
            "strided blocks (what runs)": lambda: window_attention(q, k, v, layout),
            "fused SDPA on contiguous blocks": lambda: F.scaled_dot_product_attention(qg[:, None], kg[:, None], vg[:, None]),
            "QKᵀ GEMMs alone": lambda: torch.bmm(qg, kg.transpose(1, 2)),
            "softmax alone": lambda: scores.softmax(-1),
            "PV GEMMs alone": lambda: torch.bmm(scores, vg),
            "bmm → softmax → bmm, eager": lambda: composed(qg, kg, vg),
            "bmm → softmax → bmm, torch.compile": lambda: compiled(qg, kg, vg),
        }
        runs = {"dense": lambda: [dense_attention(q, k, v) for _ in range(calls)]}
        runs |= {name: (lambda f=f: [f() for _ in range(calls)]) for name, f in parts.items()}
        times = timed_ratios(runs, device, repeats)
        flops = layout.pairs() / tokens**2
        for name in parts:
            cells, median = ratio_cells(times, name)
            print(f"| ±{layout.window} | {describe(layout)} | {name} | {flops:.3f} | {cells} | {median / flops:.2f} |",
                  flush=True)


class ReuseStepProcessor:
    """Runs a strategy at a reuse step (its cache filled with zeros): what a plan does at that cell."""

    def __init__(self, strategy, original) -> None:
        self.strategy = strategy
        self.original = original
        self.context = StepContext(step=1, num_steps=2, cfg=True)

    def __call__(self, attn, hidden_states, **kwargs):
        cache = {"residual": torch.zeros_like(hidden_states), "output": torch.zeros_like(hidden_states)}
        call = AttentionCall(attn, self.original, hidden_states, kwargs, self.context, cache, frozenset(), lambda _: None)
        return self.strategy.attention(call)


def transformer_table(device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print(f"\nwhole transformer (embedded config: 6 layers, 4 heads × 32, patch 2; random weights), batch 2 "
          f"(1 sample × CFG), every layer `wars` ±N/8 at a reuse step vs dense, {device}, {dtype}, "
          f"{repeats} interleaved rounds")
    print("| tokens | shape (layout) | whole FLOPs ratio | latency ratio, median (min–max) | latency / FLOPs | "
          "attn-core FLOPs ratio |")
    print("|---|---|---|---|---|---|")
    embedded = load_adapter("dit", "embedded").transformer.config
    for tokens in TOKENS:
        side = int(tokens**0.5) * embedded.patch_size
        adapter = load_adapter("dit", config={**dict(embedded), "sample_size": side})
        model = adapter.transformer.to(device, dtype).eval()
        x = torch.randn(2, embedded.in_channels, side, side, device=device, dtype=dtype)
        t, y = torch.tensor([500, 500], device=device), torch.tensor([3, 10], device=device)
        layers = adapter.self_attention_layers()
        originals = [attn.processor for attn in layers]
        strategies = {}
        for shape in SHAPES:
            strategy = get_strategy_class("wars").from_params({"window_shape": shape})
            strategy.validate(tokens)
            strategies[shape] = strategy

        def forward(shape: str | None) -> None:
            for attn, original in zip(layers, originals):
                attn.set_processor(original if shape is None else ReuseStepProcessor(strategies[shape], original))
            model(x, timestep=t, class_labels=y)

        def run(shape: str | None) -> Callable[[], None]:
            return lambda: forward(shape)

        with torch.no_grad():
            flops = {}
            for shape in (None, *SHAPES):
                with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                    forward(shape)
                flops[shape] = counter.get_total_flops()
            times = timed_ratios({"dense": run(None), **{s: run(s) for s in SHAPES}}, device, repeats)
        forward(None)  # originals back
        for shape, strategy in strategies.items():
            ratio = flops[shape] / flops[None]
            cells, median = ratio_cells(times, shape)
            print(f"| {tokens} | {describe(strategy.layout)} | {ratio:.3f} | {cells} | {median / ratio:.2f} | "
                  f"{strategy.layout.pairs() / tokens**2:.3f} |", flush=True)


def quality_table() -> None:
    adapter = load_adapter("dit", "embedded")
    settings = SamplerSettings("dpmsolver++", num_steps=20, guidance_scale=4.0, batch_size=20)
    target = plan_target(adapter, settings)
    labels, seeds = [i % 10 for i in range(20)], list(range(1000, 1020))
    n, dense_steps = adapter.num_tokens, (0, 4, 8, 12, 16)
    print(f"\nWA-RS quality at equal FLOPs, embedded model ({n} tokens), 20 DPM-Solver++ steps, guidance 4: every "
          f"layer dense at steps {dense_steps} and `wars` between them; fidelity of 20 samples (seeds 1000–1019, "
          "labels 0–9 twice; no calibration involved) to dense")
    print("| window | layout | attn FLOPs | whole FLOPs | rel. L1 vs dense | PSNR vs dense (dB) |")
    print("|---|---|---|---|---|---|")
    row = tuple("full" if s in dense_steps else "wars" for s in range(settings.num_steps))
    grid = tuple((cell,) * adapter.num_layers for cell in row)
    dense_samples = run_plan(adapter, None, labels, seeds, settings).samples
    dense = plan_flops(adapter, None, settings, batch=len(labels))
    for window in (n // 16, n // 8, n // 4):
        # each shape at the same window size sees about 2w + 1 keys per query: (nearly) equal FLOPs
        seen = set()
        for params in ({"window_shape": "band"}, {"window_shape": "blocks"}, {"window_shape": "tiles"},
                       {"window_shape": "blocks", "block_size": window_layout("blocks", n, window).block // 2},
                       {"window_shape": "blocks", "block_size": wide_block(window)}):
            params = {"window_size": window, **params}
            name = describe(window_layout(params["window_shape"], n, window, params.get("block_size")))
            if name in seen:
                continue
            seen.add(name)
            plan = Plan(target, grid, params={"wars": params})
            samples = run_plan(adapter, plan, labels, seeds, settings).samples
            flops = plan_flops(adapter, plan, settings, batch=len(labels))
            print(f"| ±{window} | {name} | {flops.attention / dense.attention:.1%} | {flops.total / dense.total:.1%} | "
                  f"{relative_l1(samples, dense_samples):.4f} | {psnr(samples, dense_samples):.1f} |", flush=True)


def module_table(device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print(f"\nDiT-XL-sized self-attention module (1152 wide, 16 heads), {device}, {dtype}: % of dense "
          "(ditplan measured | paper Table 2, A100)")
    print("| tokens | batch | strategy | window | attn FLOPs % | latency % | paper FLOPs % | paper latency % |")
    print("|---|---|---|---|---|---|---|---|")
    attn = Attention(query_dim=1152, heads=16, dim_head=72, bias=True).to(device, dtype).eval()
    original = AttnProcessor2_0()
    for tokens, batch in ((1024, 16), (4096, 2)):  # DiT: 8 images × CFG; PixArt: 1 image × CFG
        x = torch.randn(batch, tokens, 1152, device=device, dtype=dtype)
        shape = AttentionShape(batch=batch, tokens=tokens, dim=1152, heads=16)
        context = StepContext(step=1, num_steps=2, cfg=True)
        dense_flops = get_strategy_class("full")().attention_flops(shape, True, frozenset())
        cache = {"output": torch.zeros_like(x), "residual": torch.zeros_like(x)}
        strategies = {"asc": get_strategy_class("asc")(), "ast": get_strategy_class("ast")()}
        for name in ("wars", "wars+asc"):
            for window in SHAPES:
                strategies[f"{name}/{window}"] = get_strategy_class(name).from_params({"window_shape": window})
        for strategy in strategies.values():
            strategy.validate(tokens)
        call = AttentionCall(attn, original, x, {}, context, cache, frozenset(), lambda _: None)
        runs = {"dense": lambda: original(attn, x)}
        runs |= {name: (lambda s=s: s.attention(call)) for name, s in strategies.items()}
        with torch.no_grad():
            times = timed_ratios(runs, device, repeats)
        for name, strategy in strategies.items():
            flops = strategy.attention_flops(shape, True, frozenset())
            paper_latency, paper_flops = PAPER[tokens][strategy.name]
            median = ratio_stats(times, name)[0]
            window = describe(strategy.layout) if hasattr(strategy, "layout") else "—"
            print(f"| {tokens} | {batch} | {strategy.name} | {window} | {flops / dense_flops:.0%} | {median:.0%} | "
                  f"{paper_flops}% | {paper_latency}% |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=10,
                        help="attention core: calls per config per round (one call at 256 tokens takes ~1 ms)")
    parser.add_argument("--parts", default="core,transformer",
                        help="comma-separated: core, transformer, quality, anatomy")
    parser.add_argument("--dit-xl", action="store_true", help="also the DiT-XL-sized module table")
    args = parser.parse_args()
    print_provenance()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    parts = set(args.parts.split(","))
    if "core" in parts:
        core_table(device, dtype, args.repeats, batch=2, heads=4, head_dim=32, calls=args.calls)
    if "transformer" in parts:
        transformer_table(device, dtype, max(5, args.repeats // 2))
    if "quality" in parts:
        quality_table()
    if "anatomy" in parts:
        anatomy_table(device, dtype, args.repeats, args.calls, batch=2, heads=4, head_dim=32)
    if args.dit_xl:
        core_table(device, dtype, args.repeats, batch=2, heads=16, head_dim=72)
        module_table(device, dtype, args.repeats)


if __name__ == "__main__":
    main()
