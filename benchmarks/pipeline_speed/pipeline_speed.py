"""Plans applied to a stock diffusers pipeline give the speed-up they give in ditplan's own loop.

Two workloads, each timed in one process, every config taking turns in every round (median of
``--repeats`` after a warm-up, min–max band shown), all at 20 DPM-Solver++ steps:

- a latent DiT with random weights (12 layers × 384 wide, 256 tokens; random weights are fine for a
  speed ratio): greedy D3 and D6 (DiTFastAttn Algorithm 1, calibrated on seeds 0–1), run through
  ditplan's loop (``run_plan``) and through ``DiTPipeline.__call__`` after
  ``ditplan.apply_plan(pipe, plan)``, on other seeds (100, 101, …);
- the embedded digit DiT in a stock ``DiTPipeline`` (``ditplan.models.pipelines.embedded_pipeline``)
  with the quickstart's fastest SparseDiT plan (README: trial-24, p1-s1_6, 36 of 256 tokens).

Both paths must also give the same samples: the largest difference is printed per plan.
``--compile`` adds ``pipe.transformer.compile()`` with the plan applied (first call and steady state).

    python benchmarks/pipeline_speed/pipeline_speed.py [--repeats 5] [--samples 2] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: common.py
import torch  # noqa: E402
from common import print_provenance, ratio_stats  # noqa: E402
from diffusers import DiTPipeline  # noqa: E402

import ditplan  # noqa: E402
from ditplan.evaluators.cost import interleaved_times  # noqa: E402
from ditplan.models.adapters import load_adapter  # noqa: E402
from ditplan.models.pipelines import IdentityDecoder, embedded_pipeline  # noqa: E402
from ditplan.models.sampling import make_scheduler  # noqa: E402
from ditplan.plan import Plan, load_plan  # noqa: E402
from ditplan.plansearch.greedy import DEFAULT_THRESHOLDS, greedy_search, threshold_name  # noqa: E402
from ditplan.spec import SamplerSettings  # noqa: E402
from ditplan.strategies.apply import run_plan  # noqa: E402
from ditplan.strategies.curves import Constant  # noqa: E402
from ditplan.strategies.finetune_sparse import layout_plan  # noqa: E402
from ditplan.strategies.sdtm import SparseLayout  # noqa: E402

SETTINGS = SamplerSettings("dpmsolver++", num_steps=20, guidance_scale=4.0, batch_size=64)
LATENT_DIT = {"sample_size": 32, "patch_size": 2, "in_channels": 4, "out_channels": 8, "num_layers": 12,
              "num_attention_heads": 6, "attention_head_dim": 64, "num_embeds_ada_norm": 1000}


def pipeline_run(pipe: DiTPipeline, labels: list[int], seeds: list[int]) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        generator = [torch.Generator().manual_seed(s) for s in seeds]
        images = pipe(class_labels=labels, generator=generator, num_inference_steps=SETTINGS.num_steps,
                      guidance_scale=SETTINGS.guidance_scale, output_type="np").images
        return torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # (N, C, H, W), clamped to [-1, 1]

    return run


def loop_run(adapter, plan: Plan | None, labels: list[int], seeds: list[int]) -> Callable[[], torch.Tensor]:
    """ditplan's own loop, its samples clamped as a pipeline's output is."""
    return lambda: run_plan(adapter, plan, labels, seeds, SETTINGS).samples.clamp(-1, 1)


def planned(pipe: DiTPipeline, plan: Plan | None) -> DiTPipeline:
    """``pipe`` with ``plan`` applied once, as a user's deployed pipeline would be (not timed)."""
    if plan is not None:
        ditplan.apply_plan(pipe, plan)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compare(title: str, configs: dict[str, Callable[[], torch.Tensor]], repeats: int) -> None:
    """Warm up (and keep the samples), time interleaved, print ratios to each path's dense run."""
    samples = {name: run() for name, run in configs.items()}
    times = interleaved_times(configs, torch.device("cpu"), repeats)
    print(f"\n{title}\n")
    print("| path | plan | latency (s, median) | ratio to dense (median, min–max) | max |Δ| vs the other path |")
    print("|---|---|---|---|---|")
    for name in configs:
        path, plan = name.split(":")
        median, low, high = ratio_stats(times, name, dense=f"{path}:dense")  # per round: a round's runs share the noise
        other = f"{'pipe' if path == 'loop' else 'loop'}:{plan}"
        delta = (samples[name] - samples[other]).abs().max().item()
        print(f"| {path} | {plan} | {statistics.median(times[name]):.2f} | {median:.2f} "
              f"({low:.2f}–{high:.2f}) | {delta:.1e} |", flush=True)


def greedy_plans(adapter, out: Path) -> dict[str, Plan]:
    plans = {}
    for index in (2, 5):  # D3, D6
        name, delta = threshold_name(index), DEFAULT_THRESHOLDS[index]
        path = out / f"latent-dit-{name}.yaml"
        if path.exists() and load_plan(path).target.weights_hash == adapter.weights_hash:
            plans[name] = load_plan(path)
            continue
        result = greedy_search(adapter, SETTINGS, [0, 1], [0, 1], delta)
        plans[name] = result.plan.with_provenance(name=name)
        plans[name].save(path)
        print(f"greedy {name} (δ={delta}) on the random latent DiT: {result.forwards} forwards, {result.seconds:.0f} s",
              flush=True)
    return plans


def latent_dit(args: argparse.Namespace) -> None:
    adapter = load_adapter("dit", config=LATENT_DIT, seed=0)
    labels, seeds = [i * 97 % 1000 for i in range(args.samples)], [100 + i for i in range(args.samples)]
    plans = {"dense": None, **greedy_plans(adapter, Path(args.plans_out))}
    configs = {}
    for name, plan in plans.items():
        # one pipeline per plan, on its own copy of the same weights
        pipe = planned(DiTPipeline(transformer=copy.deepcopy(adapter.transformer), vae=IdentityDecoder(),
                                   scheduler=make_scheduler(adapter, SETTINGS.scheduler)), plan)
        configs[f"loop:{name}"] = loop_run(adapter, plan, labels, seeds)
        configs[f"pipe:{name}"] = pipeline_run(pipe, labels, seeds)
    compare(f"Random latent DiT, 12 × 384, 256 tokens, {args.samples} samples, {args.repeats} rounds", configs,
            args.repeats)


def embedded_sparse(args: argparse.Namespace) -> None:
    adapter = load_adapter("dit", "embedded")
    layout = SparseLayout(modules=((1, 6),), curve=Constant(0.875), weights="sparse/p1-s1_6", pool_layers=1)
    plan = layout_plan(adapter, layout, SETTINGS)
    labels, seeds = [i % 10 for i in range(args.embedded_samples)], [100 + i for i in range(args.embedded_samples)]
    configs = {}
    for name, chosen in (("dense", None), ("p1-s1_6 r=0.875", plan)):
        configs[f"loop:{name}"] = loop_run(adapter, chosen, labels, seeds)
        configs[f"pipe:{name}"] = pipeline_run(planned(embedded_pipeline(), chosen), labels, seeds)
    compare(f"Embedded digit DiT in a stock DiTPipeline, {args.embedded_samples} samples, {args.repeats} rounds",
            configs, args.repeats)
    if args.compile:
        compiled(plan, labels, seeds, args.repeats)


def compiled(plan: Plan, labels: list[int], seeds: list[int], repeats: int) -> None:
    """``pipe.transformer.compile()`` with the plan applied: does it run, match eager, pay?"""
    eager_pipe, compiled_pipe = planned(embedded_pipeline(), plan), planned(embedded_pipeline(), plan)
    eager, run = pipeline_run(eager_pipe, labels, seeds), pipeline_run(compiled_pipe, labels, seeds)
    compiled_pipe.transformer.compile()
    started = time.perf_counter()
    first = run()
    first_seconds = time.perf_counter() - started
    times = interleaved_times({"eager": eager, "compiled": run}, torch.device("cpu"), repeats)
    median, low, high = ratio_stats(times, "compiled", dense="eager")
    print(f"\ntorch.compile (in place, after apply_plan), same plan and samples: first call {first_seconds:.1f} s; "
          f"then compiled/eager latency {median:.2f} ({low:.2f}–{high:.2f}); "
          f"max |Δ| vs eager {(first - eager()).abs().max().item():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=2, help="samples per run on the latent DiT")
    parser.add_argument("--embedded-samples", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--plans-out", default="runs/bench-pipeline")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", choices=["latent", "embedded"])
    args = parser.parse_args()
    print_provenance()
    torch.set_num_threads(args.threads)
    if args.only != "embedded":
        latent_dit(args)
    if args.only != "latent":
        embedded_sparse(args)


if __name__ == "__main__":
    main()
