"""Peers: the accelerations DiT users run today, beside ditplan's plans, on an experiment's held-out seeds.

Rows (every one on the same model, sampler and held-out seeds):
- diffusers' caches at their documented default configs (``FirstBlockCacheConfig()``, ``TaylorSeerCacheConfig()``,
  ``MagCacheConfig()`` with the model's magnitude ratios from diffusers' own calibration; ditplan only names DiT's
  attention modules for TaylorSeer, whose default patterns match none), installed by diffusers' own ``apply_*``
  functions as a plan's ``cache`` part, and ditplan's run-time forecast cache at its defaults;
- fixed plans of the ``--families`` chosen: SparseDiT's settings (each fine-tuned network next to the model at the
  paper's curve and at constant rates), block caching (``reuse``, ``forecast``) every other step (both from
  ``common.family_plans``);
- plan files (``--plans``): greedy and learned plans;
- cache-dit (``pip install 'ditplan[peers]'``): DBCache configs through ``cache_dit.enable_cache`` on a
  stock ``DiTPipeline`` (``embedded_pipeline``), when cache-dit is installed.

The plans go through ``measure`` (timed: what ``ditplan run``'s held-out stage reports from): dense and every plan take
turns in each of ``refine.latency_repeats`` rounds in one process; latency ratio = median over rounds of
the plan's time / dense's time in the same round (band: min–max). cache-dit cannot be expressed as a plan,
so its rows run in a second interleaved loop whose dense is the stock pipeline without cache-dit (same
seeds, same rounds); rel. L1 is to that dense, FLOPs are counted from the block parts that ran.

    python benchmarks/peers/peers.py --experiment ditplan/experiments/quickstart.yaml --families "block caching" \
        --plans benchmarks/peers/results/peers-plans/*.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# NOTE: cache-dit logs every enable/disable, and warns of every pattern check it skips, to stdout
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import (  # noqa: E402
    add_experiment_arguments,
    family_plans,
    load_experiment,
    measure_held_out,
    print_provenance,
    print_row,
)

from ditplan.evaluators.cost import executed_flops, turn_order  # noqa: E402
from ditplan.evaluators.domain import reference_images  # noqa: E402
from ditplan.evaluators.measure import DENSE, quality, rounds  # noqa: E402
from ditplan.evaluators.reference import cached_calibration  # noqa: E402
from ditplan.models.adapters import adapter_from_spec  # noqa: E402
from ditplan.models.family import ModelAdapter  # noqa: E402
from ditplan.models.sampling import plan_target  # noqa: E402
from ditplan.plan import Plan, load_plan  # noqa: E402
from ditplan.spec import ExperimentSpec  # noqa: E402
from ditplan.strategies.diffusers_cache import CACHE_METHODS, ExecutionCounter  # noqa: E402

PIPELINE_DENSE = "stock DiTPipeline (dense)"
FIXED_FAMILIES = ("SparseDiT", "block caching")  # common.family_plans' families shown beside the peers


def diffusers_default_plans(adapter: ModelAdapter, spec: ExperimentSpec) -> dict[str, tuple[str, Plan]]:
    """Each run-time cache (diffusers', and ditplan's forecast cache) at its default config; MagCache with the model's magnitude ratios, which it needs
    at the sampler's step count, measured by diffusers' own calibration on the calibration seeds."""
    settings = spec.sampler.settings()
    target, (_, conditions, seeds) = plan_target(adapter, settings), spec.seed_set("calibration")
    plans = {}
    for method in CACHE_METHODS:
        measured = cached_calibration(method, adapter, settings, conditions, seeds, spec.evaluation.cache_dir)
        cache = {"method": method, **({"config": measured} if measured else {})}
        library = CACHE_METHODS[method].library
        plans[f"{library} {method} (default config)"] = (f"{library} cache", Plan.uniform(target, cache=cache))
    return plans


def cache_dit_configs() -> dict[str, tuple[Any, Any]]:
    """name → (DBCacheConfig, calibrator config or None): F1B0 (first block computed, the rest cached)
    at cache-dit's default threshold (0.08) and at two looser ones, with and without its TaylorSeer
    calibrator. cache-dit's own default (``DBCacheConfig()``: F8B0) refuses a model of fewer than 8
    blocks (``Fn_compute_blocks 8 must be less than the number of transformer blocks``)."""
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    f1b0 = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0}
    return {
        "cache-dit DBCache F1B0 R0.08": (DBCacheConfig(**f1b0), None),
        "cache-dit DBCache F1B0 R0.12": (DBCacheConfig(**f1b0, residual_diff_threshold=0.12), None),
        "cache-dit DBCache F1B0 R0.24": (DBCacheConfig(**f1b0, residual_diff_threshold=0.24), None),
        "cache-dit DBCache F1B0 R0.12 + TaylorSeer order 1": (
            DBCacheConfig(**f1b0, residual_diff_threshold=0.12), TaylorSeerCalibratorConfig(taylorseer_order=1)),
    }


def _null_class_on_label_embeddings(transformer: torch.nn.Module) -> None:
    """Map DiTPipeline's null label 1000 to the embedded model's null class at every label embedding.
    NOTE: cache-dit replaces the transformer's forward and calls the blocks itself, so the pipeline's
    transformer-level null-class hook never sees its calls; the label embeddings see every one."""
    from diffusers.models.embeddings import LabelEmbedding

    null = transformer.config.num_embeds_ada_norm
    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.register_forward_pre_hook(lambda _, args: (torch.where(args[0] == 1000, null, args[0]), *args[1:]))


def cache_dit_metrics(adapter: ModelAdapter, spec: ExperimentSpec) -> dict[str, dict[str, float]]:
    """cache-dit configs on a stock DiTPipeline, interleaved with the same pipeline without cache-dit."""
    import cache_dit

    from ditplan.models.pipelines import embedded_pipeline

    pipe = embedded_pipeline(spec.sampler.scheduler)
    pipe.set_progress_bar_config(disable=True)
    _null_class_on_label_embeddings(pipe.transformer)
    seed_set, settings = spec.seed_set("held_out"), spec.sampler.settings()
    counter = ExecutionCounter(pipe.transformer)
    configs: dict[str, tuple[Any, Any] | None] = {PIPELINE_DENSE: None, **cache_dit_configs()}

    def run(config: tuple[Any, Any] | None, conditions: list, seeds: list[int]) -> tuple[torch.Tensor, float, dict]:
        if config is not None:
            cache_dit.enable_cache(pipe, cache_config=config[0], calibrator_config=config[1])
        counter.reset()
        try:
            start = time.perf_counter()
            images = pipe(class_labels=list(conditions), num_inference_steps=settings.num_steps,
                          guidance_scale=settings.guidance_scale, output_type="np",
                          generator=[torch.Generator().manual_seed(s) for s in seeds]).images
            seconds = time.perf_counter() - start
        finally:
            if config is not None:
                cache_dit.disable_cache(pipe)
        samples = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2) * 2 - 1  # (N, C, H, W) in [-1, 1]
        return samples, seconds, {k: list(v) for k, v in counter.counts.items()}

    for config in configs.values():  # warm-up
        run(config, seed_set.conditions[:2], seed_set.seeds[:2])
    samples = {name: [] for name in configs}
    seconds = {name: [] for name in configs}
    flops = dict.fromkeys(configs, 0.0)
    count = spec.search.refine.latency_repeats
    for index, (conditions, seeds) in enumerate(rounds(seed_set, count)):
        rows = len(seeds) * (2 if settings.cfg else 1)  # DiTPipeline batches [cond; uncond]: one call a step
        for name in turn_order(list(configs), index, count):
            config = configs[name]
            images, spent, counts = run(config, conditions, seeds)
            samples[name].append(images)
            seconds[name].append(spent)
            flops[name] += executed_flops(adapter, counts, settings.num_steps, rows).total
    counter.remove()
    dense = torch.cat(samples[PIPELINE_DENSE])
    reference = reference_images(spec)
    out = {}
    for name in configs:
        values = quality(adapter, spec, torch.cat(samples[name]), dense, seed_set.conditions, None, reference)
        ratios = [mine / base for mine, base in zip(seconds[name], seconds[PIPELINE_DENSE])]
        values.update(flops_ratio=flops[name] / flops[PIPELINE_DENSE], latency_ratio=statistics.median(ratios),
                      latency_ratio_min=min(ratios), latency_ratio_max=max(ratios))
        out[name] = values
    return out


def cache_dit_rows(adapter: ModelAdapter, spec: ExperimentSpec) -> list[tuple[str, str, dict[str, float]]]:
    """cache-dit's rows, printed as they come (or a line saying it is not installed)."""
    try:
        import cache_dit
    except ImportError:
        print("cache-dit is not installed (pip install 'ditplan[peers]'): no cache-dit rows")
        return []
    started = time.perf_counter()
    rows = [(name, f"cache-dit {cache_dit.__version__}", values) for name, values in cache_dit_metrics(adapter, spec).items()]
    for row in rows:
        print_row(*row)
    print(f"(cache-dit rows: a second interleaved loop on a stock DiTPipeline, ratios and rel. L1 to the pipeline's own "
          f"dense run; {time.perf_counter() - started:.0f} s)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser)
    parser.add_argument("--samples", type=int, help="held-out samples (default: the experiment's refine.samples)")
    parser.add_argument("--plans", nargs="*", default=[], help="plan files (greedy D1–D6, learned plans)")
    parser.add_argument("--no-cache-dit", action="store_true", help="skip the cache-dit rows")
    parser.add_argument("--families", nargs="*", default=list(FIXED_FAMILIES), choices=FIXED_FAMILIES,
                        help="the fixed plans of these families as rows")
    args = parser.parse_args()
    print_provenance()
    spec = load_experiment(args)
    if args.samples:
        refine = spec.search.refine.model_copy(update={"samples": args.samples})
        spec = spec.model_copy(update={"search": spec.search.model_copy(update={"refine": refine})})
    torch.manual_seed(0)
    adapter = adapter_from_spec(spec.model)
    plans = diffusers_default_plans(adapter, spec)
    plans.update({name: fp for name, fp in family_plans(adapter, spec).items() if fp[0] in args.families})
    for path in args.plans:
        plan = load_plan(path)
        plans[Path(path).stem] = (plan.provenance.get("search", "plan file"), plan)
    result = measure_held_out(adapter, spec, {name: plan for name, (_, plan) in plans.items()})
    print(f"{spec.name} on cpu ({torch.get_num_threads()} threads), {spec.model.dtype}: {len(result.seed_set.seeds)} "
          f"held-out samples (seeds {result.seed_set.seeds[0]}…), {spec.search.refine.latency_repeats} rounds "
          f"interleaved with dense, {spec.sampler.num_steps} {spec.sampler.scheduler} steps, CFG "
          f"{spec.sampler.guidance_scale}; plans: {result.seconds:.0f} s")
    print("| row | side | latency ratio (band) | FID | KID | kid_low | rel. L1 to dense | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(DENSE, "", result.metrics[DENSE])] + [(n, side, result.metrics[n]) for n, (side, _) in plans.items()]
    for row in rows:
        print_row(*row)
    if not args.no_cache_dit:
        rows += cache_dit_rows(adapter, spec)
    learned = {n for n, (side, _) in plans.items() if side.startswith("optuna")}
    training_free = {n for n in learned if not (plans[n][1].sparse or {}).get("weights")}
    print_goals(rows, learned, training_free)


def print_goals(rows: list[tuple[str, str, dict[str, float]]], learned: set[str], training_free: set[str]) -> None:
    """The goals, read off the rows: the fastest training-free learned plan within +10 % of dense's FID and
    ``kid_low`` (goal: ≥ 4×), and for every peer row the fastest learned plan at ≤ its latency ratio and ≤ its FID."""
    dense = rows[0][2]
    by_name = {name: values for name, _, values in rows}

    def fastest(names: set[str], latency: float, fid: float, kid_low: float = float("inf")) -> str | None:
        ok = [n for n in names if by_name[n]["latency_ratio"] <= latency and by_name[n]["fid"] <= fid
              and by_name[n].get("kid_low", float("inf")) <= kid_low]
        return min(ok, key=lambda n: by_name[n]["latency_ratio"], default=None)

    fid_cap, kid_cap = 1.10 * dense["fid"], 1.10 * dense["kid_low"]
    print(f"\n## Goals (medians; a latency difference inside the rows' bands decides nothing)\n"
          f"training-free learned plans: {len(training_free)} of {len(learned)} learned rows")
    goal = f"training-free learned plan ≥ 4× within +10 % FID (≤ {fid_cap:.3f}) and kid_low (≤ {kid_cap:.4f})"
    best = fastest(training_free, float("inf"), fid_cap, kid_cap)
    if best is None:
        print(f"- {goal}: NO plan within both")
    else:
        v = by_name[best]
        verdict = "met" if v["latency_ratio"] <= 0.25 else "NOT met"
        print(f"- {goal}: {verdict}: {best} {1 / v['latency_ratio']:.2f}× (latency {v['latency_ratio']:.3f}, band "
              f"{v['latency_ratio_min']:.2f}–{v['latency_ratio_max']:.2f}) at FID {v['fid']:.3f}, "
              f"kid_low {v['kid_low']:.4f}")
    print("| peer row | its latency | its FID | fastest learned at ≤ latency and ≤ FID | latency | FID |")
    print("|---|---|---|---|---|---|")
    for name, side, v in rows[1:]:
        if name in learned or name == PIPELINE_DENSE:
            continue
        match = fastest(learned, v["latency_ratio"], v["fid"])
        theirs = f"| {name} | {v['latency_ratio']:.3f} | {v['fid']:.3f} "
        if match is None:
            print(theirs + "| **none** | | |")
        else:
            print(theirs + f"| {match} | {by_name[match]['latency_ratio']:.3f} | {by_name[match]['fid']:.3f} |")

if __name__ == "__main__":
    main()
