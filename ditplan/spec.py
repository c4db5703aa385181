"""The experiment file: model, sampler, workload, strategies, objectives, search, output.

Validated with pydantic; a bad file raises :class:`SpecError` whose one-line message names the field
path and the bad value, e.g. ``quickstart.yaml: sampler.num_steps = -3: Input should be greater than 0``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ditplan.errors import UserError
from ditplan.files import read_yaml
from ditplan.registry import METRICS, SCHEDULERS, did_you_mean

if TYPE_CHECKING:
    import torch


class SpecError(UserError):
    """The experiment file is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Upper bounds that keep a typo from asking for terabytes or centuries; far above any real experiment.
MAX_SEED = 2**62  # seeds plus the set offsets and counts stay below 2**63 (torch.Generator's range)
MAX_SAMPLES = 100_000  # samples in one seed set
MAX_STEPS = 10_000
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Count = Annotated[int, Field(gt=0, le=MAX_SAMPLES)]


class ModelSpec(_Strict):
    """kind: the model family (``ditplan.models.families``): ``dit`` (class labels), ``pixart``, ``flux``, ``sd3``,
    ``qwen-image`` (prompts), or one a ``--plugin`` module registers.

    source: ``embedded`` (ditplan's 256-token digit DiT) or ``embedded-1024`` (its 1,024-token GPU-sized
    sibling), a local folder in diffusers pipeline layout, or a hub id.
    config: instead of ``source``, a transformer config dict: random weights (tests, smoke runs).
    vae: a folder/hub id whose ``vae/`` decodes latents; none for pixel-space models.
    prompt_embeddings: a prompt-conditioned model without its text encoders: a safetensors file with
    ``<prompt>.embeds`` and ``<prompt>.mask`` (PixArt) or ``<prompt>.pooled`` (FLUX, SD3) for every prompt and
    for the empty prompt "" (but FLUX).
    text_encoder: instead, the folder or hub id of the pipeline whose text encoders encode the prompts.
    device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    image_size: pixels per side, for families that render any size (flux); default the family's.
    dtype: what the transformer (and VAE) compute in: ``float32`` (default), ``float16`` or ``bfloat16``
    (GPUs); latents and the scheduler stay float32. Dense references are cached per dtype.
    Local folders and files are relative to the experiment file (see :func:`resolve_paths`).
    """

    kind: str = "dit"
    source: str | None = None
    config: dict[str, Any] | None = None
    vae: str | None = None
    prompt_embeddings: str | None = None
    text_encoder: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    image_size: int | None = Field(None, gt=0, le=1 << 14)
    seed: Seed = 0

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of model.source (folder, hub id or 'embedded') and model.config")
        return self

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class SamplerSettings:
    """scheduler: a name in :data:`~ditplan.registry.SCHEDULERS`; guidance_scale ≤ 1 switches classifier-free
    guidance off; guidance: ``cfg`` (classifier-free guidance, a conditional and an unconditional half) or
    ``embedded`` (a guidance-distilled model takes the scale as an input: one conditional call per step);
    true_cfg_scale: with ``embedded``, > 1 adds classifier-free guidance at that scale on top (FLUX.1's true CFG:
    an unconditional call per step as well)."""

    scheduler: str = "dpmsolver++"
    num_steps: int = 20
    guidance_scale: float = 4.0
    batch_size: int = 50
    guidance: str = "cfg"
    true_cfg_scale: float = 1.0

    @property
    def cfg(self) -> bool:
        """Whether each step runs classifier-free guidance (a conditional and an unconditional prediction)."""
        return self.cfg_scale > 1.0

    @property
    def cfg_scale(self) -> float:
        """The classifier-free guidance scale: ``guidance_scale`` with ``cfg``, ``true_cfg_scale`` with ``embedded``."""
        return self.guidance_scale if self.guidance == "cfg" else self.true_cfg_scale


def _choice(what: str, value: str, choices: list[str]) -> str:
    """``value`` when it is one of ``choices``; else the message pydantic shows after the field and value."""
    if value not in choices:
        raise ValueError(f"unknown {what}{did_you_mean(value, choices)}; choose one of {sorted(choices)}")
    return value


class SamplerSpec(_Strict):
    """How every sample is drawn, dense or under a plan."""

    scheduler: str = Field("dpmsolver++", description="dpmsolver++, ddim, euler or flow-euler (flow-matching models)")
    num_steps: int = Field(20, gt=0, le=MAX_STEPS, description="denoising steps")
    guidance_scale: float = Field(4.0, ge=0, le=1e4, description="classifier-free guidance; ≤ 1 switches it off")
    batch_size: Count = Field(50, description="samples per transformer batch")
    guidance: Literal["cfg", "embedded"] = Field(
        "cfg", description="how guidance_scale acts: cfg (classifier-free guidance) or embedded (a guidance-distilled "
        "model such as FLUX.1-dev takes it as an input)")
    true_cfg_scale: float = Field(
        1.0, ge=0, le=1e4, description="with guidance: embedded, classifier-free guidance on top of the distilled "
        "guidance (FLUX.1's true CFG: a second, unconditional call per step, with the empty prompt); ≤ 1 switches it off")

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return _choice("scheduler", value, SCHEDULERS.choices())

    @model_validator(mode="after")
    def _true_cfg_on_distilled_guidance(self) -> SamplerSpec:
        if self.true_cfg_scale > 1.0 and self.guidance != "embedded":
            raise ValueError(f"true_cfg_scale = {self.true_cfg_scale} adds classifier-free guidance to a guidance-distilled "
                             "model (guidance: embedded); with guidance: cfg, guidance_scale is the CFG scale")
        return self

    def settings(self) -> SamplerSettings:
        return SamplerSettings(self.scheduler, self.num_steps, self.guidance_scale, self.batch_size, self.guidance,
                               self.true_cfg_scale)


class SeedSet(NamedTuple):
    """The samples of one seed set: a condition (class label or prompt) and a seed per sample."""

    name: str
    conditions: list[Any]
    seeds: list[int]


# Default offsets of the search and held-out seeds from ``workload.seed``: far enough apart that no
# sample count an experiment can afford makes the three sets overlap (checked anyway).
SEARCH_SEED_OFFSET = 10_000
HELD_OUT_SEED_OFFSET = 20_000


class WorkloadSpec(_Strict):
    """The fixed conditions every plan is judged on: ``classes`` (DiT) or ``prompts`` (PixArt).

    Three disjoint seed sets, each drawing its conditions in turn from the list (sample i gets
    condition i mod len, seed ``first + i``):

    - calibration, from ``seed``: greedy calibration and proxies (``greedy.calibration_samples``);
    - search, from ``search_seed`` (default ``seed + 10000``): trial scores (``search.samples``);
    - held-out, from ``held_out_seed`` (default ``seed + 20000``): every figure a report, an export rule
      or the README states (``search.refine.samples``); for prompt workloads, ``held_out_prompts``
      (default: the workload's prompts, on the held-out seeds).

    ``samples_per_condition`` sizes the plain workload (``ditplan generate``, ``ditplan evaluate``'s
    default count)."""

    classes: list[Annotated[int, Field(ge=0, le=2**31)]] | None = None
    prompts: list[str] | None = None
    samples_per_condition: Count = 1
    seed: Seed = 0
    search_seed: Seed | None = None
    held_out_seed: Seed | None = None
    held_out_prompts: list[str] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> WorkloadSpec:
        if (self.classes is None) == (self.prompts is None):
            raise ValueError("give exactly one of workload.classes and workload.prompts")
        if not (self.classes or self.prompts):
            raise ValueError("the workload is empty; list at least one class or prompt")
        if self.held_out_prompts is not None and (self.prompts is None or not self.held_out_prompts):
            raise ValueError("workload.held_out_prompts needs a prompt workload and at least one prompt")
        if len(self._base()) * self.samples_per_condition > MAX_SAMPLES:
            raise ValueError(f"the workload has {len(self._base())} conditions × {self.samples_per_condition} samples; "
                             f"at most {MAX_SAMPLES:,} samples in all")
        return self

    def _base(self) -> list[Any]:
        return list(self.classes if self.classes is not None else self.prompts)  # type: ignore[arg-type]

    def conditions(self) -> list[Any]:
        return [c for _ in range(self.samples_per_condition) for c in self._base()]

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.conditions()))]

    def all_conditions(self) -> list[Any]:
        """Every class label or prompt any seed set draws (what the model must know)."""
        return list(dict.fromkeys(self.classes)) if self.classes is not None else self.all_prompts()

    def all_prompts(self) -> list[str]:
        """Every prompt any seed set draws (what a prompt encoder must cover); empty for class workloads."""
        return list(dict.fromkeys([*(self.prompts or []), *(self.held_out_prompts or [])]))

    def first_seeds(self) -> dict[str, int]:
        """The first seed of each set: ``calibration``, ``search`` and ``held_out``."""
        return {
            "calibration": self.seed,
            "search": self.seed + SEARCH_SEED_OFFSET if self.search_seed is None else self.search_seed,
            "held_out": self.seed + HELD_OUT_SEED_OFFSET if self.held_out_seed is None else self.held_out_seed,
        }

    def seed_set(self, name: str, samples: int) -> SeedSet:
        """The first ``samples`` samples of set ``name`` (``calibration``, ``search`` or ``held_out``)."""
        base = self.held_out_prompts if name == "held_out" and self.held_out_prompts else self._base()
        first = self.first_seeds()[name]
        return SeedSet(name, [base[i % len(base)] for i in range(samples)], [first + i for i in range(samples)])


class EvaluationSpec(_Strict):
    """feature_extractor: torch-fidelity extractor for FID/KID/IS/precision/recall (``digits`` for the
    embedded model, ``inception-v3-compat`` with a local ``feature_extractor_weights_path``); none
    skips distribution metrics. reference: ``digits-held-out`` or a folder of real images.
    clip_weights_path: a local CLIP folder for the CLIP score of prompt workloads (skipped without).
    lpips_weights_path: a local folder in torch.hub's layout for the ``lpips`` fidelity metric
    (torch-fidelity's VGG16 LPIPS; skipped without, and an experiment whose objectives, constraints or
    refine metrics name ``lpips`` is refused without it): ``checkpoints/weights-vgg16-lpips.pth`` from
    https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-vgg16-lpips.pth and
    ``checkpoints/vgg16-397923af.pth`` from https://download.pytorch.org/models/vgg16-397923af.pth,
    downloaded once on a machine with internet (or copied from its torch hub cache); nothing is downloaded.
    latency_repeats: timed runs (after a warm-up) whose median is reported (``ditplan evaluate``), and a
    search trial's when its objectives or constraints include ``latency_ratio``.
    cache_dir: where dense references and reference statistics are cached by content hash.
    reference, feature_extractor_weights_path, clip_weights_path and lpips_weights_path are relative to
    the experiment file; cache_dir (written) to the working directory."""

    feature_extractor: str | None = None
    feature_extractor_weights_path: str | None = None
    reference: str | None = None
    clip_weights_path: str | None = None
    lpips_weights_path: str | None = None
    latency_repeats: int = Field(5, gt=0, le=1000)
    cache_dir: str = ".cache/ditplan"

    @model_validator(mode="after")
    def _reference_with_extractor(self) -> EvaluationSpec:
        if self.feature_extractor and not self.reference:
            raise ValueError("evaluation.feature_extractor needs evaluation.reference (a folder or 'digits-held-out')")
        return self


def _known_metric(name: str) -> str:
    return _choice("metric", name, METRICS.choices())


class _MetricSpec(_Strict):
    metric: str

    @field_validator("metric")
    @classmethod
    def _metric_is_known(cls, value: str) -> str:
        return _known_metric(value)


class ObjectiveSpec(_MetricSpec):
    direction: Literal["minimize", "maximize"] | None = None  # default: the metric's own

    def resolved_direction(self) -> str:
        return self.direction or METRICS[self.metric].direction


class ConstraintSpec(_MetricSpec):
    """A feasibility bound on a metric, e.g. ``{metric: rel_l1, max: 0.1}`` (Optuna: value ≤ 0 is feasible).
    relative_to: ``dense`` bounds the metric's excess over dense's value on the same search samples, e.g.
    ``{metric: kid, max: 0.0, relative_to: dense}`` (no worse than dense) — for metrics against a real
    reference (FID, KID), whose dense value an experiment cannot know in advance; none: the bound as given."""

    max: float | None = None
    min: float | None = None
    relative_to: Literal["dense"] | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> ConstraintSpec:
        if (self.max is None) == (self.min is None):
            raise ValueError("a constraint needs exactly one of max and min")
        return self

    def violation(self, value: float, dense: float | None = None) -> float:
        """How far ``value`` is past the bound (≤ 0: within it); ``dense``: dense's value on the same samples,
        needed when the bound is relative to it."""
        if self.relative_to == "dense":
            if dense is None:
                raise ValueError(f"the {self.metric} bound is relative to dense: give dense's {self.metric}")
            value -= dense
        return value - self.max if self.max is not None else self.min - value  # type: ignore[operator]


class SparseSpaceSpec(_Strict):
    """SparseDiT choices of a search. networks: fine-tuned networks (``ditplan finetune-sparse``) a plan
    may run on, as folders relative to the model's (``auto``: every one found under its ``sparse/``);
    running on none is always a choice. pool_layers: Poolingformer bottom-layer counts for plans on
    the pretrained weights. curves: pruning-curve families for plans on a network, their rates drawn
    inside the range the network was trained for. cache_every / cache_stop: block caching on a network's
    own blocks, drawn when ``methods`` lists ``reuse`` or ``forecast`` (the grid cannot draw those blocks):
    its SDTM modules, each skipped as a whole, or all its blocks compute at the first two steps and every
    k-th step from the third on (k from ``cache_every``), up to a fraction of the steps (``cache_stop``) after which
    every step computes, and reuse or forecast their residuals in between; ``cache_every: []`` draws none."""

    networks: Literal["auto"] | list[str] = "auto"
    pool_layers: list[int] = [0, 1, 2]
    curves: list[str] = ["constant", "paper", "linear", "cosine", "step"]
    cache_every: list[Annotated[int, Field(ge=2)]] = [2, 3]
    cache_stop: list[Annotated[float, Field(gt=0, le=1)]] = [0.8, 1.0]


class CacheSpaceSpec(_Strict):
    """One run-time cache as a search choice: a trial either runs it (every grid cell ``full``,
    no SparseDiT part: the cache decides at run time what computes) or draws the grid and sparse parts
    as usual. method: diffusers' ``first_block``, ``taylorseer`` or ``mag`` (MagCache: its ``mag_ratios`` are
    measured once on the calibration batch and every drawn plan carries them), or ditplan's ``forecast_cache``
    (the first ``fn`` and last ``bn`` blocks always compute, the middle ones are skipped on the first blocks'
    residual change and Taylor-forecast); params: narrower choices for its config fields, e.g.
    ``{threshold: [0.05, 0.1]}`` (default: the method's own search values)."""

    method: str
    params: dict[str, list[Any]] = {}


class IntervalSpaceSpec(_Strict):
    """FORA's cache interval on the grid's blocks (every layer the cells draw), drawn as one global choice
    when ``methods`` lists ``reuse`` or ``forecast``: a trial runs none, or skips those blocks together with
    one of those methods at every step from the third on except every k-th (k from ``every``), up to a
    fraction of the steps (``stop``) after which every step computes; the cells draw the computed steps."""

    every: list[Annotated[int, Field(ge=2)]] = Field([2, 3, 4, 5], min_length=1)
    stop: list[Annotated[float, Field(gt=0, le=1)]] = Field([0.8, 1.0], min_length=1)


class GuidanceSpaceSpec(_Strict):
    """Guidance on an interval, drawn per step segment: the unconditional branch computed at every step, or
    one of ``fills`` (``reuse``, ``forecast``, ``off``: :mod:`ditplan.strategies.guidance`) standing in for it
    between the steps that compute it: every k-th of the segment from its first (k from ``every``; 0: none of
    the segment's steps)."""

    fills: list[str] = Field(["reuse", "forecast", "off"], min_length=1)
    every: list[Annotated[int, Field(ge=0)]] = Field([2, 3, 0], min_length=1)

    @field_validator("every")
    @classmethod
    def _every_skips(cls, value: list[int]) -> list[int]:
        if 1 in value:
            raise ValueError("every: 1 computes every step (that is 'full', always drawn); give 0 or 2 and more")
        return value


class SpaceSpec(_Strict):
    """methods: strategies a (layer group × step segment) cell may take, attention strategies and block
    caching (``reuse``, ``forecast``) alike; none: the model family's own (DiT and PixArt: full, ast, wars,
    asc, wars+asc; SD3: full, ast, asc, reuse, forecast; FLUX: full, ast, reuse, forecast). layer_groups / step_segments: a count of even pieces or
    explicit cut points (1 per layer / per step = the full grid). params: narrower choices for strategy
    parameters, e.g. ``{wars: {window_size: [16, 32]}}``. sparse: SparseDiT choices joined to the cell
    choices (none: cells only). cache: one of diffusers' caches as a further choice (none: not drawn).
    interval: a cache interval for the grid's blocks as a further choice (none: not drawn). guidance: the
    unconditional branch of classifier-free guidance skipped at some steps, per step segment (none: not drawn)."""

    methods: list[str] | None = None
    layer_groups: int | list[int] = 3
    step_segments: int | list[int] = 4
    params: dict[str, dict[str, list[Any]]] = {}
    sparse: SparseSpaceSpec | None = None
    cache: CacheSpaceSpec | None = None
    interval: IntervalSpaceSpec | None = None
    guidance: GuidanceSpaceSpec | None = None


class RefineSpec(_Strict):
    """The held-out evaluation: after the search, the greedy plans and the feasible Pareto front are
    measured again on the held-out seed set with the expensive metrics (domain FID, latency), on the
    driver so that timings do not contend; results go to a second study ``<name>-refined``.

    samples: held-out samples per plan. Domain FID fits a Gaussian to the extractor's features, so it
    needs more samples than the features have dimensions for a full-rank covariance (the digit
    extractor's are 128-d: the default 200); KID is unbiased at any count. latency_repeats: the
    held-out samples are drawn in this many equal rounds; in each round dense and every plan take
    turns in one process, so each plan's latency ratio is the median over rounds (band: min–max)."""

    metrics: list[str] = ["rel_l1", "latency_ratio"]
    samples: Count = 200
    latency_repeats: int = Field(3, gt=0, le=1000)

    @field_validator("metrics")
    @classmethod
    def _metrics_are_known(cls, value: list[str]) -> list[str]:
        return [_known_metric(m) for m in value]

    @model_validator(mode="after")
    def _rounds_fit(self) -> RefineSpec:
        if self.samples < self.latency_repeats:
            raise ValueError(f"refine.samples ({self.samples}) must be at least latency_repeats ({self.latency_repeats})")
        return self


ProposalSpread = Literal["knapsack", "flops", "hull"]
PROPOSAL_SPREADS = get_args(ProposalSpread)  # how proposals are picked: ditplan.plansearch.proxy.propose


class ProposalSpec(_Strict):
    """Trials proposed before the sampler's own, enqueued with their parameters so the sampler learns
    from them. from: ``proxy`` — per-(step, layer, strategy) sensitivities measured once on the
    calibration batch (greedy's loop at δ = 0: each cell alone against dense), then plans that trade
    summed sensitivity against FLOPs (:mod:`ditplan.plansearch.proxy`). count: how many of
    those plans, from the most faithful to the fastest; they count as learned trials. spread: how they
    are picked (:func:`ditplan.plansearch.proxy.propose`): ``knapsack`` (default) — the least summed
    sensitivity at evenly spaced predicted FLOPs; ``flops`` — the Lagrangian optima nearest to those FLOPs;
    ``hull`` — evenly spaced in the list of Lagrangian optima (bunched near dense). samples:
    the first K samples of the calibration batch the proxy is measured on (default: greedy's
    ``calibration_samples``; fewer cost proportionally less). gain_probes: steps at which the proxy
    measures how much a cell's loss costs the final samples (:func:`ditplan.plansearch.proxy.measure_gains`;
    each probe runs every strategy at that step, from there to the end); proposals then weigh the cells
    by it. 0: summed raw losses. max_reuse_run: no layer of a proposal reuses an earlier step's attention
    or block output (``ast``, ``reuse``, ``forecast``) more than this many steps in a row before it computes
    again (``knapsack`` only; null: no limit). The proxy prices every reuse against the step before it, so it cannot see what a recompute in a
    long run is worth; the default 10 was chosen on the embedded model's held-out seeds (README). A
    ``rel_l1`` max constraint of the search bounds the proposals too when gains are measured: they run
    from dense to the fastest plan whose predicted rel. L1 (its cells' summed weighted losses) is within it.
    intervals: after those, propose each cache interval of the space (``search.space.interval``) alone, every
    cell ``full`` (FORA's fixed schedules; gaps within ``max_reuse_run``), named ``interval-reuse-5-1.0`` and
    so on. The proxy prices plans by rel. L1, which on the 1,024-token embedded model ranks these below mixed
    plans of twice their held-out FID (README), so it proposes none of them itself."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    source: Literal["proxy"] = Field("proxy", alias="from")
    count: int = Field(10, gt=0, le=100_000)
    spread: ProposalSpread = "knapsack"
    samples: Count | None = None
    gain_probes: int = Field(7, ge=0, le=1000)
    max_reuse_run: int | None = Field(10, ge=1, le=100_000)
    intervals: bool = False

    @model_validator(mode="before")
    @classmethod
    def _run_limit_needs_knapsack(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("spread", "knapsack") != "knapsack":
            if data.get("max_reuse_run") is not None:
                raise ValueError(f"max_reuse_run needs spread 'knapsack' (the Lagrangian spread {data['spread']!r} "
                                 "decides every cell alone); set max_reuse_run: null or use spread: knapsack")
            data = {**data, "max_reuse_run": None}  # the default limit is the knapsack's
        return data


class ScreeningSpec(_Strict):
    """Two fidelities: every trial is first scored on the first ``samples`` search samples (fewer than
    ``search.samples``, so more trials fit a budget); then the ``promote`` best of them — whole
    non-dominated ranks of the feasible ones, the rank that does not fit whole thinned evenly along the
    first objective — are scored again on all ``search.samples`` and join the study as trials of their
    own (the sampler sees them; a resumed study keeps them and promotes none twice). The front, its
    hypervolume, the held-out evaluation and exports come from the promoted trials only: plans are
    chosen at full fidelity, never on a mix of the two."""

    samples: Count
    promote: int = Field(gt=0, le=1_000_000)


class SearchSpec(_Strict):
    """sampler: tpe (default), nsga2, gp or random, seeded by ``seed``. trials: learned trials per
    study (warm-start plans not counted; a trial that draws an earlier trial's parameters counts too, and
    takes that trial's values without being evaluated). workers: Ray tasks in flight. batch: trials the sampler
    proposes at once, each from the trials finished before the batch; the next batch is asked when this one is
    recorded, so one driver's search gives the same trials and values whatever ``workers`` and whatever order
    they finish in (latencies aside): a larger batch keeps more workers busy, a smaller one lets the sampler
    learn sooner (workers above it idle; with several drivers on one study, their batches interleave by
    timing). samples: the first K samples of
    the search seed set, on which every trial is judged. reference_point: hypervolume reference in objective units
    (default: dense cost, and the worst quality seen). storage: an Optuna RDB URL for several drivers
    (default: a journal file in the run directory). tracking_uri: MLflow (default: SQLite in the run
    directory). cpus_per_trial / gpus_per_trial: Ray resources of one trial (its torch threads = its
    CPUs; gpus_per_trial 1 on a GPU cluster). trial_timeout_s: a trial not finished this long after
    it was submitted (time queued in Ray included: keep workers within what the cluster holds) fails
    and its Ray task is cancelled. heartbeat_interval_s / grace_period_s (RDB storage): drivers record
    a heartbeat per running trial; one silent for the grace period (default twice the interval) was cut
    off by a dead driver and is queued to run again (up to max_retries times). refine: the held-out
    evaluation of the front and the greedy plans (none skips it: then nothing is measured on held-out
    seeds and reports say so). Trials whose metrics break a constraint are kept and shown, but never
    on a front, in a hypervolume, refined, tagged ``pareto`` or exported. proposals: trials proposed from
    the calibration batch's proxy sensitivities, run first (none: the sampler starts cold). warm_start:
    ``greedy`` — ``ditplan run`` enqueues greedy's D1 … D6 before the learned trials, with their
    parameters where the space expresses them (the full grid does), otherwise run whole and recorded
    with the parameters of their projection onto the space, so the sampler learns from them either
    way; ``none`` — it does not (greedy still runs, as a comparison side). screening: score trials on
    fewer samples first and the best again on all (:class:`ScreeningSpec`; none: every trial on all)."""

    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    population_size: int = Field(50, ge=2, le=MAX_SAMPLES)  # NSGA-II generation size
    trials: int = Field(30, gt=0, le=1_000_000)
    workers: int = Field(2, gt=0, le=4096)
    batch: int = Field(4, gt=0, le=4096)
    seed: Seed = 0
    samples: Count = 10
    objectives: list[ObjectiveSpec] = [ObjectiveSpec(metric="rel_l1"), ObjectiveSpec(metric="flops_ratio")]
    constraints: list[ConstraintSpec] = []
    space: SpaceSpec = SpaceSpec()
    reference_point: list[float] | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    cpus_per_trial: float = Field(1.0, gt=0, le=1024)
    gpus_per_trial: float = Field(0.0, ge=0, le=1024)
    trial_timeout_s: float = Field(3600.0, gt=0)
    heartbeat_interval_s: int = Field(30, gt=0)
    grace_period_s: int | None = Field(None, gt=0)
    max_retries: int = Field(2, ge=0, le=100)
    refine: RefineSpec | None = RefineSpec()
    proposals: ProposalSpec | None = None
    warm_start: Literal["greedy", "none"] = "greedy"
    screening: ScreeningSpec | None = None

    @model_validator(mode="after")
    def _reference_fits(self) -> SearchSpec:
        if self.reference_point is not None and len(self.reference_point) != len(self.objectives):
            raise ValueError(f"reference_point has {len(self.reference_point)} values for {len(self.objectives)} objectives")
        return self

    @model_validator(mode="after")
    def _screening_is_cheaper(self) -> SearchSpec:
        if self.screening is not None and self.screening.samples >= self.samples:
            raise ValueError(f"search.screening.samples ({self.screening.samples}) must be fewer than search.samples "
                             f"({self.samples}), the fidelity promoted trials are scored at; lower it or drop screening")
        return self

    def trial_samples(self) -> int:
        """The search samples a trial is first scored on (all of them without screening)."""
        return self.screening.samples if self.screening else self.samples

    def meets_constraints(self, values: Mapping[str, float], dense: Mapping[str, float]) -> bool:
        """Whether metrics ``values`` meet every constraint (``dense``: dense's values on the same samples, for
        bounds relative to dense); a constraint whose metric is not among ``values`` is not met."""
        return all(c.metric in values and c.violation(values[c.metric], dense.get(c.metric)) <= 0
                   for c in self.constraints)


class GreedySpec(_Strict):
    """DiTFastAttn's greedy search as run by ``ditplan run``: thresholds δ (D1 … D6 by default), the
    first K samples of the calibration seed set as calibration batch, the WA-RS window (default tokens // 8)."""

    thresholds: list[float] = [0.025, 0.05, 0.075, 0.1, 0.125, 0.15]
    calibration_samples: Count = 8
    window_size: int | None = Field(None, gt=0, le=2**20)


class BaselineSpec(_Strict):
    """A preset users run today, measured on the held-out seeds beside greedy and learned plans (``ditplan
    run``; ``ditplan compare`` shows it with the best learned plan at ≤ its latency). Exactly one of:
    cache: one of the run-time caches, ``{method: first_block, config: {}}`` (config: its fields, default
    the documented defaults; ``mag`` needs the model's ``mag_ratios``, see ``ditplan.calibrated_config``); sparse: a SparseDiT setting, ``{network: sparse/p1-s1_5, curve: {name:
    paper, r_min: 0.5, r_max: 0.875}}`` (the network's folder relative to the model's)."""

    name: str
    cache: dict[str, Any] | None = None
    sparse: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> BaselineSpec:
        if (self.cache is None) == (self.sparse is None):
            raise ValueError(f"baseline {self.name!r} needs exactly one of cache and sparse")
        return self


class ExperimentSpec(_Strict):
    """One experiment: a model, its sampler and workload, and how plans for it are searched and judged."""

    name: str = Field(description="the experiment's name: its study, its run directory (``${name}``)")
    model: ModelSpec = Field(description="the diffusion transformer")
    sampler: SamplerSpec = Field(SamplerSpec(), description="scheduler, steps, guidance and batch size")
    workload: WorkloadSpec = Field(description="the conditions and the three disjoint seed sets")
    evaluation: EvaluationSpec = Field(EvaluationSpec(), description="metrics' extractors, references and timing")
    search: SearchSpec = Field(SearchSpec(), description="the learned multi-objective search")
    greedy: GreedySpec = Field(GreedySpec(), description="DiTFastAttn's greedy search (D1 … D6)")
    baselines: list[BaselineSpec] = Field([], description="presets measured beside the plans on held-out seeds")
    output_dir: str = Field("runs/${name}", description="the run directory, relative to the working directory")

    @model_validator(mode="after")
    def _metrics_apply(self) -> ExperimentSpec:
        search = self.search
        named = [o.metric for o in search.objectives] + [c.metric for c in search.constraints]
        named += search.refine.metrics if search.refine else []
        domain = [m for m in named if m in ("fid", "kid", "kid_low", "class_agreement")]
        if domain and not self.evaluation.feature_extractor:
            raise ValueError(f"metric {domain[0]} needs evaluation.feature_extractor and evaluation.reference")
        if "class_agreement" in domain and (self.evaluation.feature_extractor != "digits" or self.workload.classes is None):
            raise ValueError("metric class_agreement needs the digits extractor and a class-conditional workload")
        if "lpips" in named and not self.evaluation.lpips_weights_path:
            raise ValueError("metric lpips needs evaluation.lpips_weights_path: set it to a local folder holding "
                             "torch-fidelity's LPIPS checkpoints (nothing is downloaded), or drop lpips")
        return self

    @model_validator(mode="after")
    def _seed_sets_disjoint(self) -> ExperimentSpec:
        sizes = self._set_sizes()
        spans = {name: range(first, first + sizes[name]) for name, first in self.workload.first_seeds().items()}
        names = list(spans)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                if spans[a].start < spans[b].stop and spans[b].start < spans[a].stop:
                    raise ValueError(
                        f"the {a} seeds {spans[a].start}…{spans[a].stop - 1} overlap the {b} seeds "
                        f"{spans[b].start}…{spans[b].stop - 1}; move workload.search_seed / workload.held_out_seed apart"
                    )
        return self

    @model_validator(mode="after")
    def _proxy_fits_calibration(self) -> ExperimentSpec:
        proposals = self.search.proposals
        if proposals is not None and (proposals.samples or 0) > self.greedy.calibration_samples:
            raise ValueError(f"search.proposals.samples ({proposals.samples}) is more than the calibration batch "
                             f"(greedy.calibration_samples = {self.greedy.calibration_samples}); lower it or raise that")
        return self

    def _set_sizes(self) -> dict[str, int]:
        refine = (self.search.refine or RefineSpec()).samples  # the held-out set exists without a refine stage too
        return {"calibration": self.greedy.calibration_samples, "search": self.search.samples, "held_out": refine}

    def seed_set(self, name: str) -> SeedSet:
        """The ``calibration``, ``search`` or ``held_out`` set at the size this experiment uses."""
        return self.workload.seed_set(name, self._set_sizes()[name])

    def proxy_batch(self) -> SeedSet:
        """The calibration samples the proxy is measured on: the first ``search.proposals.samples`` (all
        of them by default)."""
        name, conditions, seeds = self.seed_set("calibration")
        k = (self.search.proposals.samples if self.search.proposals else None) or len(seeds)
        return SeedSet(name, conditions[:k], seeds[:k])

    def run_dir(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class of the section at ``loc`` (``("search", "space")`` → SpaceSpec), list indices skipped."""
    model: type[BaseModel] | None = ExperimentSpec
    for key in loc:
        if isinstance(key, int) or model is None:
            continue
        field = model.model_fields.get(key)
        model = model_in(field.annotation) if field is not None else None
    return model


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``list[X]``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(model_in, get_args(annotation)) if m is not None), None)


def _unknown_field(loc: tuple[Any, ...]) -> str:
    """The message for a field its section does not have: the closest valid field and every one."""
    model = _section_model(loc[:-1])
    if model is None:
        return "unknown field"
    names = sorted(f.alias or name for name, f in model.model_fields.items())
    return f"unknown field{did_you_mean(str(loc[-1]), names)}; valid fields: {', '.join(names)}"


def format_error(label: str, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] in ("missing", "extra_forbidden") else f" = {value!r}"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = _unknown_field(first["loc"])
    return f"{label}: {where}{shown}: {message}{extra}"


# The experiments shipped inside the package: ``ditplan run quickstart`` runs ``ditplan/experiments/quickstart.yaml``.
SHIPPED_EXPERIMENTS = Path(__file__).parent / "experiments"
# What the Python API takes as an experiment: a file, a shipped experiment's name, its data or a spec.
Experiment = str | Path | Mapping[str, Any] | ExperimentSpec


def shipped_experiments() -> list[str]:
    """The names of the experiments shipped inside the package (``quickstart``, ``digits-1024`` …)."""
    return sorted(p.stem for p in SHIPPED_EXPERIMENTS.glob("*.yaml"))


def experiment_file(experiment: str | Path) -> Path:
    """The experiment file ``experiment`` names: a file path as given, or, when no such file exists and it
    names no folder, the shipped experiment of that name (``quickstart`` or ``quickstart.yaml``). An unknown
    bare name is one line with the closest shipped name."""
    path = Path(experiment)
    if path.exists() or len(path.parts) != 1:
        return path
    name = path.stem if path.suffix in (".yaml", ".yml") else path.name
    if name in shipped_experiments():
        return SHIPPED_EXPERIMENTS / f"{name}.yaml"
    raise SpecError(f"no experiment file or shipped experiment {str(experiment)!r}"
                    f"{did_you_mean(name, shipped_experiments())}; shipped: {', '.join(shipped_experiments())}")


def experiment_label(experiment: Any) -> str:
    """How messages name an experiment: its file, or ``experiment <name>`` for data or a spec."""
    if isinstance(experiment, (str, Path)):
        return str(experiment_file(experiment))
    name = experiment.name if isinstance(experiment, ExperimentSpec) else dict(experiment).get("name", "?")
    return f"experiment {name}"


def _validated(data: Any, label: str) -> ExperimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{label}: an experiment file is a YAML mapping with name, model, sampler and workload")
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_error(label, err)) from None
    except RecursionError:
        raise SpecError(f"{label}: nests too deeply to be an experiment file") from None


def load_spec(experiment: Experiment) -> ExperimentSpec:
    """The experiment ``experiment`` names (:func:`experiment_file`; relative paths in it resolved against
    the file's folder), or the one its data describe (relative paths against the working directory); a
    spec is returned as it is. The caller's data are never changed."""
    if isinstance(experiment, ExperimentSpec):
        return experiment
    if isinstance(experiment, Mapping):
        return _validated(resolve_paths(dict(experiment), Path.cwd()), experiment_label(experiment))
    path = experiment_file(experiment)
    data = read_yaml(path, "experiment file")
    return _validated(resolve_paths(data, path.parent) if isinstance(data, dict) else data, str(path))


# Paths an experiment names, read relative to the experiment file's folder (not the working directory):
# files and folders it reads. ``output_dir`` and ``evaluation.cache_dir`` are where ditplan writes and
# stay relative to the working directory, like any output path on a command line.
FILE_PATHS = (("model", "prompt_embeddings"), ("evaluation", "feature_extractor_weights_path"),
              ("evaluation", "clip_weights_path"), ("evaluation", "lpips_weights_path"))
# Fields that name a local folder, a hub id (``owner/name``) or an embedded model's name.
MODEL_SOURCES = (("model", "source"), ("model", "vae"), ("model", "text_encoder"))
# ``evaluation.reference``: a folder of real images, or this built-in reference set by name.
DIGITS_REFERENCE = "digits-held-out"


def _could_be_a_hub_id(value: str) -> bool:
    """``owner/name`` (one slash, not written as a path) or a bare name: what a hub or ditplan resolves by name."""
    return not value.startswith((".", "~")) and value.count("/") <= 1


def _resolved(value: str, base: Path, by_name: bool) -> str:
    """``value`` as an absolute path against ``base`` (``~`` expanded) when it is a path; with ``by_name``
    a value that could be a hub id or an embedded model's name stays as it is unless ``base`` holds a
    folder of that name. A mistyped local folder written as a path (``./modles/x``, ``runs/a/b``) is
    resolved like any path, so loading it names the missing folder instead of asking a hub."""
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    if by_name and _could_be_a_hub_id(value) and not (base / path).exists():
        return value
    return os.path.abspath(base / path)


def resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of the experiment ``data`` whose relative paths (:data:`FILE_PATHS`, local folders of
    :data:`MODEL_SOURCES`, a reference folder) are made absolute against ``base``, the experiment file's
    folder; hub ids and built-in names stay as they are; ``data`` itself is left as it is."""
    out = dict(data)
    fields = [(section, key, False) for section, key in FILE_PATHS] + [(s, k, True) for s, k in MODEL_SOURCES]
    fields.append(("evaluation", "reference", False))
    for section, key, by_name in fields:
        part = out.get(section)
        value = part.get(key) if isinstance(part, dict) else None
        if not isinstance(value, str) or not value or (key == "reference" and value == DIGITS_REFERENCE):
            continue
        out[section] = {**part, key: _resolved(value, base, by_name)}
    return out


def resolved_experiment_text(experiment: Experiment) -> str:
    """The experiment as YAML with its relative paths made absolute: what ``ditplan run`` keeps in the run
    directory, so that the copy reads the same files from anywhere."""
    if isinstance(experiment, (str, Path)):
        path = experiment_file(experiment)
        data = read_yaml(path, "experiment file")
        if not isinstance(data, dict):
            raise SpecError(f"{path}: an experiment file is a YAML mapping with name, model, sampler and workload")
        data = resolve_paths(data, path.parent)
    else:
        data = load_spec(experiment).model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
