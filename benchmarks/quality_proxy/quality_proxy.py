"""Which quality metric, measured on a few search samples, ranks plans as their held-out FID does?

A search scores every trial on its first K search samples; what a user reads is FID on the held-out
samples. This benchmark takes plans whose held-out FID is already measured (``benchmarks/gpu_table/gpu_table.py``
tables), samples each on the first K search seeds beside dense, computes every quality metric a search trial
can use (fidelity to dense: rel. L1, MSE, PSNR, SSIM; against the real reference: domain FID, KID, KID on the
low-level layer, class agreement) and gives each metric's Kendall τ with the held-out FID, for each K.

Plans: every row of the ``--tables``. A row named like one of gpu_table's family plans (``reuse every 5th
step``) is that plan; any other row is the plan file of that name in the folder beside its table
(``…-table.txt`` → ``…-plans/<row>.yaml``, how the table files under ``benchmarks/*/results`` are kept).

    python benchmarks/quality_proxy/quality_proxy.py --experiment ditplan/experiments/digits-1024.yaml --device cpu --dtype float32 \\
        --tables benchmarks/gpu_table/results/digits-1024-cpu-caching-table*.txt \\
                 benchmarks/digits_1024_learned/results/digits-1024-cpu-learned-*table.txt --samples 4 8 16 40
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from scipy.stats import kendalltau

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
from common import (  # noqa: E402
    add_experiment_arguments,
    family_plans,
    load_experiment,
    print_provenance,
)

from ditplan.evaluators.domain import applicable_metrics  # noqa: E402
from ditplan.evaluators.measure import DENSE, quality  # noqa: E402
from ditplan.models.adapters import adapter_from_spec  # noqa: E402
from ditplan.plan import Plan, load_plan  # noqa: E402
from ditplan.progress import progress_bar  # noqa: E402
from ditplan.registry import direction  # noqa: E402
from ditplan.strategies.apply import run_plan  # noqa: E402

FIDELITY = ("rel_l1", "mse", "psnr", "ssim")
PERIODS = (2, 3, 4, 5, 6)  # gpu_table's --cache-periods the committed tables used


def held_out_fids(table: Path) -> dict[str, float]:
    """Plan name → held-out FID, read from a gpu_table output (its column ``FID``)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.read_text().splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    column = rows[0].index("FID")
    return {row[0]: float(row[column]) for row in rows[1:]}


def table_plans(tables: list[Path], families: dict[str, Plan]) -> tuple[dict[str, Plan | None], dict[str, float]]:
    """The plans of every table's rows (dense once, as None) and their held-out FIDs."""
    plans: dict[str, Plan | None] = {DENSE: None}
    fids: dict[str, float] = {}
    for table in tables:
        for name, fid in held_out_fids(table).items():
            if name == DENSE:
                fids.setdefault(DENSE, fid)
                continue
            label = name if name in families else f"{table.stem.removesuffix('-table')}/{name}"
            plans[label] = families.get(name) or load_plan(table.with_name(table.stem.removesuffix("-table") + "-plans")
                                                           / f"{name}.yaml")
            fids[label] = fid
    return plans, fids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_arguments(parser, device=True)
    parser.add_argument("--tables", nargs="+", type=Path, required=True, help="gpu_table outputs with held-out FIDs")
    parser.add_argument("--samples", nargs="+", type=int, default=[4, 16], help="first K search samples, each K")
    args = parser.parse_args()
    print_provenance()
    spec = load_experiment(args)
    adapter = adapter_from_spec(spec.model)
    families = {name: plan for name, (_, plan) in family_plans(adapter, spec, PERIODS).items()}
    plans, fids = table_plans(args.tables, families)
    _, conditions, seeds = spec.workload.seed_set("search", max(args.samples))
    settings = spec.sampler.settings()
    started = time.perf_counter()
    samples = {}
    with progress_bar(len(plans), "plans sampled on the search seeds") as bar:
        for name, plan in plans.items():
            samples[name] = run_plan(adapter, plan, conditions, seeds, settings).samples
            bar.update(1)
    metrics = [*FIDELITY, *applicable_metrics(spec, getattr(adapter, "num_classes", None))]
    print(f"{spec.name}, {spec.model.dtype} on {next(adapter.transformer.parameters()).device}: {len(plans)} plans "
          f"(dense included) on the first {max(args.samples)} search samples (seeds {seeds[0]}…); held-out FID from "
          f"the tables (200 held-out samples, seeds {spec.workload.first_seeds()['held_out']}…); "
          f"{time.perf_counter() - started:.0f} s of sampling")
    order = sorted(plans, key=lambda n: fids[n])
    for k in args.samples:
        values = {name: quality(adapter, spec, x[:k], samples[DENSE][:k], conditions[:k], metrics)
                  for name, x in samples.items()}
        print(f"\n## first {k} search samples\n")
        print("| plan | held-out FID | " + " | ".join(metrics) + " |")
        print("|---|---|" + "---|" * len(metrics))
        for name in order:
            print(f"| {name} | {fids[name]:.2f} | " + " | ".join(f"{values[name][m]:.4g}" for m in metrics) + " |")
        taus = {}
        for m in metrics:
            tau = kendalltau([values[n][m] for n in order], [fids[n] for n in order]).statistic
            taus[m] = -tau if direction(m) == "maximize" else tau
        print("\nKendall τ with held-out FID (1: the same order; higher-is-better metrics negated): "
              + ", ".join(f"{m} {t:.2f}" for m, t in taus.items() if not math.isnan(t)))


if __name__ == "__main__":
    main()
