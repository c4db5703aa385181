"""Greedy DiTFastAttn plans (D1–D6) vs a learned multi-objective search on the embedded model, at equal
budget, judged on held-out seeds.

Protocol (the experiment's three seed sets): greedy calibrates on the calibration seeds; the learned
search scores its trials on the search seeds and picks its (search-seed) Pareto front; both sides'
plans are then measured on the held-out seeds (relative L1 to dense on the same seeds × analytic FLOPs
ratio: deterministic, so valid on a loaded machine), and each side's hypervolume is taken there.

Budget, in transformer sample-forwards (rows × steps, CFG counted): greedy = its calibration of D1–D6
+ one search-seed evaluation per plan. The learned side gets exactly that, and pays from it for
everything it uses: the proxy's calibration forwards (``--proposals``), greedy's calibration and
evaluations when it warm-starts from greedy (``--warm-start``), and its trials; the number of trials
is what is left, rounded down (``--search-samples``: each learned trial scored on fewer search samples,
so more trials fit; greedy's evaluations stay charged at the experiment's; ``--screen-samples K --promote P``:
every trial first on K search samples, then the P best again on the trials' full fidelity, charged
too, and the front chosen from those P). Several ``--seeds`` repeat the search (the proxy and the greedy plans are deterministic and measured once; every repeat is charged
for them).

    python benchmarks/search_vs_greedy/search_vs_greedy.py --full-grid --proposals 46 --search-samples 5 --seeds 0 1 2
    python benchmarks/search_vs_greedy/search_vs_greedy.py --full-grid --proposals 10 --seeds 0 1 2
    python benchmarks/search_vs_greedy/search_vs_greedy.py --full-grid --proposals 58 --search-samples 5 --screen-samples 2 --promote 25
    python benchmarks/search_vs_greedy/search_vs_greedy.py --seeds 0 1 2                      # cold TPE, grouped space
    python benchmarks/search_vs_greedy/search_vs_greedy.py --full-grid --proposals 10 --latency  # + held-out quality × latency

``--latency`` (needs a quiet machine) measures greedy's plans and the last repeat's front on the held-out
seeds in rounds interleaved with dense (:func:`ditplan.evaluators.measure.measure`, timed).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import add_experiment_arguments, print_provenance  # noqa: E402

from ditplan.atomic import atomic_write_text  # noqa: E402
from ditplan.evaluators.cost import sample_forwards  # noqa: E402
from ditplan.evaluators.measure import measure  # noqa: E402
from ditplan.evaluators.reference import dense_reference  # noqa: E402
from ditplan.models.adapters import experiment_adapter  # noqa: E402
from ditplan.models.sampling import plan_target  # noqa: E402
from ditplan.plan import Plan, load_plan  # noqa: E402
from ditplan.plansearch.driver import run_search  # noqa: E402
from ditplan.plansearch.greedy import (  # noqa: E402
    CANDIDATES,
    DEFAULT_THRESHOLDS,
    greedy_search,
    threshold_name,
)
from ditplan.plansearch.pareto import hypervolume  # noqa: E402
from ditplan.plansearch.proxy import experiment_proxy, proxy_candidates  # noqa: E402
from ditplan.plansearch.space import space_methods  # noqa: E402
from ditplan.plansearch.trial_task import trial_metrics  # noqa: E402
from ditplan.registry import METRICS  # noqa: E402
from ditplan.rundir import SearchDir  # noqa: E402
from ditplan.spec import PROPOSAL_SPREADS, ProposalSpec, ScreeningSpec, load_spec  # noqa: E402

QUALITY_COST = ("rel_l1", "flops_ratio")
DIRECTIONS = ["minimize", "minimize"]


def configure(spec, args):  # noqa: ANN001, ANN201
    """The experiment with the command line's learned-side choices."""
    search = {}
    if args.sampler:
        search["sampler"] = args.sampler
    if args.population:
        search["population_size"] = args.population
    if args.search_samples:
        search["samples"] = args.search_samples
    if args.screen_samples:
        search["screening"] = ScreeningSpec(samples=args.screen_samples, promote=args.promote)
    if args.full_grid:  # counts are clamped: one layer / one step per cell
        search["space"] = spec.search.space.model_copy(update={"layer_groups": 10**6, "step_segments": 10**6})
    if args.proposals is not None:
        limit = {} if args.max_reuse_run is None else {"max_reuse_run": args.max_reuse_run or None}
        search["proposals"] = ProposalSpec(count=args.proposals, samples=args.proxy_samples, spread=args.spread,
                                           gain_probes=args.gain_probes, **limit) if args.proposals else None
    return spec.model_copy(update={"search": spec.search.model_copy(update=search)})


def greedy_plans(adapter, spec, folder: Path) -> dict[str, Plan]:  # noqa: ANN001
    """D1–D6 calibrated on the calibration seeds (reused from ``folder`` when made for this model and batch)."""
    settings = spec.sampler.settings()
    target = plan_target(adapter, settings)
    _, conditions, seeds = spec.seed_set("calibration")
    plans = {}
    for index, delta in enumerate(DEFAULT_THRESHOLDS):
        name = threshold_name(index)
        path = folder / f"greedy-{name}.yaml"
        found = load_plan(path) if path.exists() else None
        if found and found.target == target and "sample_forwards" in found.provenance \
                and found.provenance["calibration"]["seeds"] == seeds and found.provenance["threshold"] == delta:
            plans[name] = found
        else:
            plans[name] = greedy_search(adapter, settings, conditions, seeds, delta).plan.with_provenance(name=name)
            plans[name].save(path)
    return plans


class HeldOut:
    """Held-out rel. L1 × FLOPs of plans, measured once per distinct plan (kept in a JSON file)."""

    def __init__(self, adapter, spec, path: Path) -> None:  # noqa: ANN001
        self.adapter, self.spec, self.path = adapter, spec, path
        self.seed_set = spec.seed_set("held_out")
        _, self.conditions, self.seeds = self.seed_set
        self.dense = dense_reference(adapter, spec.sampler.settings(), self.conditions, self.seeds, spec.evaluation.cache_dir)
        self.known = json.loads(path.read_text()) if path.exists() else {}

    def __call__(self, plan: Plan) -> tuple[float, float]:
        data = plan.to_dict()
        key = json.dumps({**{k: data[k] for k in ("params", "sparse", "grid", "target")}, "seeds": self.seeds}, sort_keys=True)
        if key not in self.known:
            values = trial_metrics(self.spec, plan, self.dense, self.seed_set, QUALITY_COST)
            self.known[key] = [values[m] for m in QUALITY_COST]
            atomic_write_text(self.path, json.dumps(self.known))
        return tuple(self.known[key])


def covered(greedy_points: dict[str, tuple[float, float]], learned: list[tuple[float, float]]) -> dict[str, str]:
    """For every Dk: ``dominated`` / ``matched`` (a learned plan at ≤ its rel. L1 and ≤ its FLOPs) or ``no``."""
    verdict = {}
    for name, (l1, flops) in greedy_points.items():
        at_most = [(a, b) for a, b in learned if a <= l1 and b <= flops]
        verdict[name] = "no" if not at_most else ("dominated" if any(a < l1 or b < flops for a, b in at_most) else "matched")
    return verdict


def main() -> None:
    parser = argparse.ArgumentParser()
    add_experiment_arguments(parser, default="benchmarks/search_vs_greedy/search-vs-greedy.yaml")
    parser.add_argument("--greedy-dir", default="runs/bench-greedy", help="reuse greedy plans found here")
    parser.add_argument("--out", default="runs/bench-search")
    parser.add_argument("--held-out-cache", default="runs/bench-held-out.json", help="held-out metrics of plans seen before")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="search seeds: one study each")
    parser.add_argument("--sampler", help="override search.sampler (tpe, nsga2, gp, random)")
    parser.add_argument("--population", type=int, help="override search.population_size (NSGA-II)")
    parser.add_argument("--full-grid", action="store_true", help="one cell per (step, layer) instead of the file's groups")
    parser.add_argument("--proposals", type=int, help="override search.proposals.count (0: none)")
    parser.add_argument("--search-samples", type=int,
                        help="search samples per learned trial (fidelity; greedy's evaluations stay at the file's)")
    parser.add_argument("--screen-samples", type=int,
                        help="search.screening: every learned trial first on this many search samples (with --promote)")
    parser.add_argument("--promote", type=int, default=20, help="screened trials scored again on --search-samples")
    parser.add_argument("--proxy-samples", type=int, help="calibration samples the proxy is measured on")
    parser.add_argument("--spread", choices=PROPOSAL_SPREADS, default=ProposalSpec().spread,
                        help="how proposals are picked (ditplan.plansearch.proxy.propose)")
    parser.add_argument("--gain-probes", type=int, default=ProposalSpec().gain_probes,
                        help="steps at which the proxy measures its gains (0: summed raw losses)")
    parser.add_argument("--max-reuse-run", type=int,
                        help="proposals reuse a layer's attention output at most this many steps in a row "
                             f"(0: no limit; default {ProposalSpec().max_reuse_run}, knapsack only)")
    parser.add_argument("--warm-start", action="store_true", help="greedy's D1–D6 join the study (charged to the learned side)")
    parser.add_argument("--latency", action="store_true", help="held-out quality × latency of greedy and the last front")
    args = parser.parse_args()
    print_provenance()
    torch.set_num_threads(2)
    experiment = load_spec(args.experiment)
    if args.screen_samples and args.screen_samples >= (args.search_samples or experiment.search.samples):
        parser.error(f"--screen-samples {args.screen_samples} must be fewer than the trials' search samples "
                     f"({args.search_samples or experiment.search.samples}), which the promoted trials are scored on")
    spec = configure(experiment, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    adapter = experiment_adapter(spec)
    settings = spec.sampler.settings()
    reference = [METRICS[m].reference for m in QUALITY_COST]

    # --- greedy D1–D6 and its budget --------------------------------------------------------------------
    greedy = greedy_plans(adapter, spec, Path(args.greedy_dir))
    greedy_eval = sample_forwards(experiment.search.samples, settings)  # the file's trial fidelity
    per_eval = sample_forwards(spec.search.trial_samples(), settings)  # the learned side's, per trial
    promoted = spec.search.screening.promote * sample_forwards(spec.search.samples, settings) if spec.search.screening else 0
    calibration = sum(int(p.provenance["sample_forwards"]) for p in greedy.values())
    budget = calibration + len(greedy) * greedy_eval
    held = HeldOut(adapter, spec, Path(args.held_out_cache))
    g_points = {name: held(plan) for name, plan in greedy.items()}
    hv_greedy = hypervolume(np.array(list(g_points.values())), DIRECTIONS, reference)
    print(f"greedy D1–D6: calibration {calibration:,} sample-forwards "
          f"({sum(p.provenance['search_seconds'] for p in greedy.values()):.0f} s) + {len(greedy)} evaluations × "
          f"{greedy_eval:,} = {budget:,} sample-forwards; held-out ({len(held.seeds)} samples) hypervolume "
          f"(rel. L1 × FLOPs ratio, reference {reference}) {hv_greedy:.4f}")
    for name, (l1, flops) in g_points.items():
        print(f"  {name}: held-out rel. L1 {l1:.4f}, FLOPs {flops:.3f}")

    # --- the learned side's fixed costs, then its trials ------------------------------------------------
    proxy_cost, proxy_path = 0, None
    if spec.search.proposals is not None:
        k = len(spec.proxy_batch().seeds)
        probes = spec.search.proposals.gain_probes
        methods = space_methods(spec.search.space, type(adapter))
        extra = proxy_candidates(methods)[len(CANDIDATES):]  # block caching, when the space has it
        # calibration seeds, like greedy's: measured once
        proxy_path = Path(args.greedy_dir) / f"proxy-{k}-gains-{probes}{''.join('-' + m for m in extra)}.json"
        proxy, _ = experiment_proxy(adapter, spec, proxy_path)
        proxy_cost = proxy.sample_forwards
        print(f"proxy: {proxy_cost:,} sample-forwards on {k} calibration samples, gains at {probes} steps, "
              f"candidates {', '.join(CANDIDATES + extra)} ({proxy.seconds:.0f} s)")
    warm_cost = budget if args.warm_start else 0  # greedy's calibration + its six plans evaluated in the study
    trials = (budget - proxy_cost - warm_cost - promoted) // per_eval
    if trials < 1:
        print(f"learned side: no trial left after its fixed costs ({proxy_cost + warm_cost + promoted:,} of {budget:,})")
        return
    spent = proxy_cost + warm_cost + trials * per_eval + promoted
    space = "full grid" if args.full_grid else f"{spec.search.space.layer_groups} × {spec.search.space.step_segments}"
    print(f"learned side: sampler {spec.search.sampler}, {space}, proposals "
          f"{spec.search.proposals.count if spec.search.proposals else 'none'}, warm start {'greedy' if args.warm_start else 'none'}: "
          f"proxy {proxy_cost:,} + warm start {warm_cost:,} + {trials} trials × {per_eval:,} "
          + (f"+ {spec.search.screening.promote} promoted × {promoted // spec.search.screening.promote:,} "
             if spec.search.screening else "") + f"= {spent:,} sample-forwards (greedy {budget:,})", flush=True)

    ratios = []
    for seed in args.seeds:
        run_dir = out / f"seed-{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        if proxy_path is not None:  # measured once above, charged to every repeat
            run_dir.mkdir(parents=True)
            shutil.copy(proxy_path, SearchDir(run_dir).proxy)
        # held-out figures are this script's own (below): the study does not refine
        seeded = spec.model_copy(update={"search": spec.search.model_copy(update={"seed": seed, "refine": None})})
        start = time.perf_counter()
        result = run_search(seeded, run_dir, trials=trials, workers=2, show_progress=False,
                            warm_start=list(greedy.values()) if args.warm_start else ())
        seconds = time.perf_counter() - start
        front = {f"trial-{t.number}": SearchDir(run_dir).load_trial(t.number) for t in result.front}
        points = {name: held(plan) for name, plan in front.items()}
        hv = hypervolume(np.array(list(points.values())), DIRECTIONS, reference)
        ratios.append(hv / hv_greedy)
        verdict = covered(g_points, list(points.values()))
        print(f"seed {seed}: {result.completed} trials ({result.failed} failed, {result.promoted} promoted) in "
              f"{seconds:.0f} s; search-seed front "
              f"{len(front)}; held-out hypervolume {hv:.4f} = {hv / hv_greedy:.2f}× greedy; "
              + ", ".join(f"{n} {v}" for n, v in verdict.items()), flush=True)
        for name, (l1, flops) in sorted(points.items(), key=lambda kv: kv[1][1]):
            print(f"  {name}: held-out rel. L1 {l1:.4f}, FLOPs {flops:.3f}")
    if len(ratios) > 1:
        print(f"hypervolume ratio over {len(ratios)} seeds: median {statistics.median(ratios):.2f}, "
              f"min {min(ratios):.2f}, max {max(ratios):.2f}")

    if args.latency:  # --- held-out quality × latency, interleaved with dense -----------------------------
        measured = measure(adapter, spec, {**greedy, **front}, spec.seed_set("held_out"), timed=True,
                           rounds_count=spec.search.refine.latency_repeats)
        metrics = measured.metrics
        pts = {n: (metrics[n]["rel_l1"], metrics[n]["latency_ratio"]) for n in {**greedy, **front}}
        lat_ref = [METRICS["rel_l1"].reference, METRICS["latency_ratio"].reference]
        hv_g = hypervolume(np.array([pts[n] for n in greedy]), DIRECTIONS, lat_ref)
        hv_l = hypervolume(np.array([pts[n] for n in front]), DIRECTIONS, lat_ref)
        print(f"\nheld-out quality × latency ({len(measured.seed_set.seeds)} samples, {spec.search.refine.latency_repeats} "
              f"rounds interleaved with dense, median ratio): hypervolume greedy {hv_g:.4f}, learned {hv_l:.4f} "
              f"({hv_l / hv_g if hv_g else float('nan'):.2f}×); covered (≤ rel. L1, ≤ latency): "
              + ", ".join(f"{n} {v}" for n, v in covered({n: pts[n] for n in greedy}, [pts[n] for n in front]).items()))
        for name in [*greedy, *front]:
            m = metrics[name]
            print(f"  {name}: rel. L1 {m['rel_l1']:.4f}, latency {m['latency_ratio']:.2f} "
                  f"({m['latency_ratio_min']:.2f}–{m['latency_ratio_max']:.2f}), FLOPs {m['flops_ratio']:.3f}")


if __name__ == "__main__":
    main()
