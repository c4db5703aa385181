"""Greedy DiTFastAttn plans (D1–D6) vs a learned multi-objective search on the embedded model.

Greedy calibrates on the experiment's calibration seeds; both sides are scored on the same path
(``plan_metrics``: the search seed set vs dense); the domain-FID check uses the held-out seeds. The
learned search gets as many full evaluations as greedy's 6 plans plus its calibration converted to
evaluation-equivalents (both in transformer sample-forwards: rows × steps, CFG counted). Prints the
hypervolume of both fronts (rel. L1 vs FLOPs ratio, one reference point), then re-measures both
fronts' latency (median of repeats, one plan at a time) and, for every Dk, the best learned plan at
≤ its latency. Then the 2× goal: learned front plans from the fastest up, the first whose domain FID
(``--fid-samples`` samples vs the held-out digits) is within +10 % of dense's, with a grid of its
samples below dense's. Last, search throughput
with 1 and 2 Ray workers.

    python benchmarks/search_vs_greedy.py [--greedy-dir runs/bench-greedy] [--out runs/bench-search]
    python benchmarks/search_vs_greedy.py --experiment benchmarks/search-vs-greedy-sparse.yaml  # + SparseDiT
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from ditplan.evaluators.cost import sample_forwards
from ditplan.evaluators.distribution import distribution_metrics
from ditplan.evaluators.reference import dense_reference
from ditplan.models.digits import load_digits
from ditplan.models.sampling import plan_target
from ditplan.strategies.apply import sample_with_plan
from ditplan.plan import load_plan
from ditplan.search.driver import reference_point, run_search
from ditplan.search.greedy import DEFAULT_THRESHOLDS, greedy_search, threshold_name
from ditplan.search.pareto import hypervolume, pareto_mask
from ditplan.search.trial_eval import plan_metrics, worker_adapter
from ditplan.spec import load_spec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="benchmarks/search-vs-greedy.yaml")
    parser.add_argument("--greedy-dir", default="runs/bench-greedy", help="reuse greedy plans found here")
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--latency-repeats", type=int, default=3)
    parser.add_argument("--throughput-trials", type=int, default=8)
    parser.add_argument("--fid-samples", type=int, default=200, help="samples per domain-FID check of the 2× goal")
    parser.add_argument("--sampler", help="override search.sampler (tpe, nsga2, gp, random)")
    parser.add_argument("--population", type=int, help="override search.population_size (NSGA-II)")
    parser.add_argument("--full-grid", action="store_true", help="one cell per (step, layer) instead of the file's groups")
    parser.add_argument("--warm-start", action="store_true",
                        help="enqueue the greedy plans and add the calibration-equivalent trials on top of them")
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = load_spec(args.experiment)
    search = {"refine": None}
    if args.sampler:
        search["sampler"] = args.sampler
    if args.population:
        search["population_size"] = args.population
    if args.full_grid:
        search["space"] = spec.search.space.model_copy(
            update={"layer_groups": 10**6, "step_segments": 10**6})  # counts are clamped: one layer/step per cell
    spec = spec.model_copy(update={"search": spec.search.model_copy(update=search)})
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    adapter = worker_adapter(spec)
    settings = spec.sampler.settings()
    target = plan_target(adapter, settings)

    # --- greedy D1–D6 (calibrated on the calibration seeds) -------------------------------------------
    greedy = {}
    _, calibration_conditions, calibration_seeds = spec.seed_set("calibration")
    for index, delta in enumerate(DEFAULT_THRESHOLDS):
        name = threshold_name(index)
        path = Path(args.greedy_dir) / f"greedy-{name}.yaml"
        found = load_plan(path) if path.exists() else None
        if found and found.target == target and "sample_forwards" in found.provenance \
                and found.provenance["calibration"]["seeds"] == calibration_seeds:
            greedy[name] = found
        else:
            result = greedy_search(adapter, settings, calibration_conditions, calibration_seeds, delta)
            greedy[name] = result.plan.with_provenance(name=name)
            greedy[name].save(path)
    calibration = sum(p.provenance["sample_forwards"] for p in greedy.values())
    seconds = sum(p.provenance["search_seconds"] for p in greedy.values())
    equivalent = calibration / sample_forwards(spec.search.samples, settings)
    budget = round(equivalent) if args.warm_start else 6 + round(equivalent)
    print(f"greedy D1–D6: {calibration} transformer sample-forwards ({seconds:.0f} s) "
          f"≈ {equivalent:.0f} full evaluations of {spec.search.samples} samples; + 6 plan evaluations "
          f"→ learned budget {budget} trials" + (" on top of the 6 enqueued greedy plans" if args.warm_start else "")
          + f"; sampler {spec.search.sampler}, {'full grid' if args.full_grid else 'grouped'} space", flush=True)

    # --- learned search, same budget ------------------------------------------------------------------
    start = time.perf_counter()
    result = run_search(spec, out / "learned", trials=budget, workers=2, show_progress=False,
                        warm_start=list(greedy.values()) if args.warm_start else ())
    learned_seconds = time.perf_counter() - start
    objectives, directions = result.objectives, result.directions
    ref = reference_point(spec)
    _, conditions, seeds = spec.seed_set("search")
    dense = dense_reference(adapter, settings, conditions, seeds, spec.evaluation.cache_dir)
    needed = tuple(objectives)
    greedy_values = {n: plan_metrics(adapter, spec, p, dense, conditions, seeds, needed) for n, p in greedy.items()}
    g = np.array([[v[o] for o in objectives] for v in greedy_values.values()])
    hv_greedy = hypervolume(g, directions, ref)
    import optuna

    from ditplan.search.driver import study_storage

    study = optuna.load_study(study_name=spec.name, storage=study_storage(spec, out / "learned"))
    own = np.array([t.values for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
                    if "source" not in t.user_attrs])
    hv_own = hypervolume(own, directions, ref)
    print(f"\nlearned: {result.completed} complete trials ({result.failed} failed) in {learned_seconds:.0f} s; "
          f"front {len(result.front)}")
    print(f"hypervolume ({objectives[0]} × {objectives[1]}, reference {ref}): greedy {hv_greedy:.4f}; "
          f"learned trials alone {hv_own:.4f} (ratio {hv_own / hv_greedy:.2f}); whole study "
          f"{result.hypervolume:.4f} (ratio {result.hypervolume / hv_greedy:.2f})")

    # --- latency of both fronts, one plan at a time ---------------------------------------------------
    lat_metrics = ("rel_l1", "latency_ratio", "flops_ratio")
    greedy_front = [n for n, keep in zip(greedy, pareto_mask(g, directions)) if keep]
    measured = {}
    for name in greedy:
        measured[name] = plan_metrics(adapter, spec, greedy[name], dense, conditions, seeds, lat_metrics, args.latency_repeats)
    learned_plans = {f"trial-{t.number}": load_plan(out / "learned" / "trials" / f"trial-{t.number:04d}.yaml")
                     for t in result.front if "source" not in t.user_attrs}  # enqueued greedy plans are not learned
    for name, plan in learned_plans.items():
        measured[name] = plan_metrics(adapter, spec, plan, dense, conditions, seeds, lat_metrics, args.latency_repeats)
    print(f"\ngreedy front: {greedy_front}. Latency: median of {args.latency_repeats} after a warm-up, ratio to dense "
          "measured in the same process.")
    print("\n| greedy | rel. L1 | FLOPs | latency | best learned at ≤ its latency | rel. L1 | FLOPs | latency | Δ rel. L1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in greedy:
        gm = measured[name]
        candidates = [(m["rel_l1"], n) for n, m in measured.items() if n in learned_plans and m["latency_ratio"] <= gm["latency_ratio"]]
        if candidates:
            _, best = min(candidates)
            lm = measured[best]
            print(f"| {name} | {gm['rel_l1']:.4f} | {gm['flops_ratio']:.2f} | {gm['latency_ratio']:.2f} | {best} | "
                  f"{lm['rel_l1']:.4f} | {lm['flops_ratio']:.2f} | {lm['latency_ratio']:.2f} | {lm['rel_l1'] - gm['rel_l1']:+.4f} |")
        else:
            print(f"| {name} | {gm['rel_l1']:.4f} | {gm['flops_ratio']:.2f} | {gm['latency_ratio']:.2f} | none | | | | |")

    # --- the 2× goal: the fastest learned plan within +10 % domain FID of dense -------------------------
    _, fid_labels, fid_seeds = spec.workload.seed_set("held_out", args.fid_samples)
    held_out = load_digits("held_out")[0]

    def domain_fid(plan):
        samples = sample_with_plan(adapter, plan, fid_labels, fid_seeds, settings)[0]
        fid = next(m.value for m in distribution_metrics(samples, held_out, metrics=("fid",)) if m.name == "fid")
        return fid, samples

    dense_fid, dense_samples = domain_fid(None)
    print(f"\ndomain FID on {args.fid_samples} samples: dense {dense_fid:.2f}; learned front from the fastest:")
    for name in sorted(learned_plans, key=lambda n: measured[n]["latency_ratio"]):
        fid, samples = domain_fid(learned_plans[name])
        latency = measured[name]["latency_ratio"]
        print(f"  {name}: latency {latency:.2f} ({1 / latency:.2f}× faster), FID {fid:.2f} ({fid / dense_fid - 1:+.1%})")
        if fid <= 1.1 * dense_fid:
            print(f"  → fastest within +10 % FID: {name}, {1 / latency:.2f}× faster than dense "
                  f"({'meets' if latency <= 0.5 else 'misses'} the 2× goal)")
            grid = out / "fastest-within-fid.png"  # 3 rows of dense over 3 rows of the plan, same seeds
            save_image((torch.cat([dense_samples[:30], samples[:30]]) + 1) / 2, grid, nrow=10)
            print(f"  samples, dense above {name} (same seeds): {grid}")
            break

    # --- throughput with 1 and 2 workers --------------------------------------------------------------
    for workers in (1, 2):
        start = time.perf_counter()
        run_search(spec, out / f"throughput-{workers}", trials=args.throughput_trials, workers=workers, show_progress=False)
        elapsed = time.perf_counter() - start
        print(f"throughput with {workers} Ray worker(s): {args.throughput_trials} trials in {elapsed:.0f} s "
              f"→ {3600 * args.throughput_trials / elapsed:.0f} trials/hour (driver start-up included)")


if __name__ == "__main__":
    main()
