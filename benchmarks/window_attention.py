"""Window attention micro-benchmark: latency ratio vs FLOPs ratio against dense attention.

Part 1 (any device): the attention core alone, 1-D window ±N/8, at 256, 1024 and 4096 tokens.
Goal on CPU: latency ratio ≤ 1.3 × FLOPs ratio.
Part 2 (``--dit-xl``, meant for a GPU in fp16): one DiT-XL-sized self-attention module (1152 wide,
16 heads) under each DiTFastAttn strategy, as % of dense, next to DiTFastAttn's Table 2.

    python benchmarks/window_attention.py [--device cuda --dtype float16 --dit-xl]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ditplan.models.context import StepContext
from ditplan.strategies import AttentionCall, AttentionShape, get_strategy_class
from ditplan.strategies.attention import dense_attention, window_attention, window_keys

# DiTFastAttn Table 2, "Attn Latency" (and "Attn FLOPs") as % of dense, A100.
PAPER = {
    1024: {"asc": (59, 50), "wars": (85, 77), "wars+asc": (51, 38), "ast": (4, 0)},
    4096: {"asc": (54, 50), "wars": (54, 51), "wars+asc": (31, 26), "ast": (3, 0)},
}


def timed(fn, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def core_table(device: torch.device, dtype: torch.dtype, repeats: int, batch: int, heads: int, head_dim: int) -> None:
    print(f"\nwindow attention core vs dense: batch {batch}, {heads} heads × {head_dim}, {device}, {dtype}, "
          f"median of {repeats}, torch threads {torch.get_num_threads()}")
    print("| tokens | window ±w | implementation | FLOPs ratio | latency ratio | latency / FLOPs |")
    print("|---|---|---|---|---|---|")
    implementations = ("banded", "flex") if device.type == "cuda" else ("banded",)
    for tokens in (256, 1024, 4096):
        window = tokens // 8
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
        dense = timed(lambda: dense_attention(q, k, v), device, repeats)
        flops_ratio = window_keys(tokens, window) / tokens**2
        for impl in implementations:
            ratio = timed(lambda: window_attention(q, k, v, window, impl), device, repeats) / dense
            print(f"| {tokens} | {window} | {impl} | {flops_ratio:.3f} | {ratio:.3f} | {ratio / flops_ratio:.2f} |")


def module_table(device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print(f"\nDiT-XL-sized self-attention module (1152 wide, 16 heads), {device}, {dtype}: % of dense "
          "(ditplan measured | paper Table 2, A100)")
    print("| tokens | batch | strategy | attn FLOPs % | latency % | paper FLOPs % | paper latency % |")
    print("|---|---|---|---|---|---|---|")
    attn = Attention(query_dim=1152, heads=16, dim_head=72, bias=True).to(device, dtype).eval()
    original = AttnProcessor2_0()
    for tokens, batch in ((1024, 16), (4096, 2)):  # DiT: 8 images × CFG; PixArt: 1 image × CFG
        x = torch.randn(batch, tokens, 1152, device=device, dtype=dtype)
        shape = AttentionShape(batch=batch, tokens=tokens, dim=1152, heads=16)
        context = StepContext(step=1, num_steps=2, cfg=True)
        dense_flops = get_strategy_class("full")().attention_flops(shape, True, frozenset())
        cache = {"output": torch.zeros_like(x), "residual": torch.zeros_like(x)}
        with torch.no_grad():
            dense_time = timed(lambda: original(attn, x), device, repeats)
            for name in ("asc", "wars", "wars+asc", "ast"):
                strategy = get_strategy_class(name).from_params({})
                strategy.validate(tokens)
                call = AttentionCall(attn, original, x, {}, context, cache, frozenset(), lambda _: None)
                latency = timed(lambda: strategy.attention(call), device, repeats)
                flops = strategy.attention_flops(shape, True, frozenset())
                paper_latency, paper_flops = PAPER[tokens][name]
                print(f"| {tokens} | {batch} | {name} | {flops / dense_flops:.0%} | {latency / dense_time:.0%} | "
                      f"{paper_flops}% | {paper_latency}% |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dit-xl", action="store_true", help="also the DiT-XL-sized module table")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    core_table(device, dtype, args.repeats, batch=2, heads=4, head_dim=32)
    if args.dit_xl:
        core_table(device, dtype, args.repeats, batch=2, heads=16, head_dim=72)
        module_table(device, dtype, args.repeats)


if __name__ == "__main__":
    main()
