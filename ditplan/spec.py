"""The experiment file: model, sampler, workload, strategies, objectives, search, output.

Validated with pydantic; a bad file raises :class:`SpecError` whose one-line message names the field
path and the bad value, e.g. ``quickstart.yaml: sampler.num_steps = -3: Input should be greater than 0``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ditplan.errors import UserError
from ditplan.models.sampling import SAMPLERS, SamplerSettings


class SpecError(UserError):
    """The experiment file is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """kind: ``dit`` (class labels) or ``pixart`` (prompts).

    source: ``embedded`` (ditplan's digit DiT), a local folder in diffusers pipeline layout, or a hub id.
    config: instead of ``source``, a transformer config dict: random weights (tests, smoke runs).
    vae: a folder/hub id whose ``vae/`` decodes latents; none for pixel-space models.
    prompt_embeddings: PixArt without its T5 encoder: a safetensors file with ``<prompt>.embeds`` and
    ``<prompt>.mask`` for every prompt and for the empty prompt "".
    device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
    """

    kind: Literal["dit", "pixart"] = "dit"
    source: str | None = None
    config: dict[str, Any] | None = None
    vae: str | None = None
    prompt_embeddings: str | None = None
    text_encoder: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.source is None) == (self.config is None):
            raise ValueError("give exactly one of model.source (folder, hub id or 'embedded') and model.config")
        if self.kind == "pixart" and not (self.prompt_embeddings or self.text_encoder):
            raise ValueError("a pixart model needs model.prompt_embeddings (a safetensors file) or model.text_encoder")
        return self

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class SamplerSpec(_Strict):
    scheduler: str = "dpmsolver++"
    num_steps: int = Field(20, gt=0)
    guidance_scale: float = Field(4.0, ge=0)
    batch_size: int = Field(50, gt=0)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SAMPLERS:
            raise ValueError(f"unknown scheduler; choose one of {sorted(SAMPLERS)}")
        return value

    def settings(self) -> SamplerSettings:
        return SamplerSettings(self.scheduler, self.num_steps, self.guidance_scale, self.batch_size)


class WorkloadSpec(_Strict):
    """The fixed conditions every plan is judged on: ``classes`` (DiT) or ``prompts`` (PixArt), each
    drawn ``samples_per_condition`` times with seeds ``seed, seed + 1, …``."""

    classes: list[int] | None = None
    prompts: list[str] | None = None
    samples_per_condition: int = Field(1, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _one_kind(self) -> WorkloadSpec:
        if (self.classes is None) == (self.prompts is None):
            raise ValueError("give exactly one of workload.classes and workload.prompts")
        if not (self.classes or self.prompts):
            raise ValueError("the workload is empty; list at least one class or prompt")
        return self

    def conditions(self) -> list[Any]:
        base = self.classes if self.classes is not None else self.prompts
        return [c for _ in range(self.samples_per_condition) for c in base]  # type: ignore[union-attr]

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(len(self.conditions()))]


class EvaluationSpec(_Strict):
    """feature_extractor: torch-fidelity extractor for FID/KID/IS/precision/recall (``digits`` for the
    embedded model, ``inception-v3-compat`` with a local ``feature_extractor_weights_path``); none
    skips distribution metrics. reference: ``digits-held-out`` or a folder of real images.
    clip_weights_path: a local CLIP folder for the CLIP score of prompt workloads (skipped without).
    latency_repeats: timed runs (after a warm-up) whose median is reported.
    cache_dir: where dense references and reference statistics are cached by content hash."""

    feature_extractor: str | None = None
    feature_extractor_weights_path: str | None = None
    reference: str | None = None
    clip_weights_path: str | None = None
    latency_repeats: int = Field(5, gt=0)
    cache_dir: str = ".cache/ditplan"

    @model_validator(mode="after")
    def _reference_with_extractor(self) -> EvaluationSpec:
        if self.feature_extractor and not self.reference:
            raise ValueError("evaluation.feature_extractor needs evaluation.reference (a folder or 'digits-held-out')")
        return self


def _known_metric(name: str) -> str:
    from ditplan.evaluators.base import METRIC_DIRECTIONS

    if name not in METRIC_DIRECTIONS:
        raise ValueError(f"unknown metric; choose one of {sorted(METRIC_DIRECTIONS)}")
    return name


class _MetricSpec(_Strict):
    metric: str

    @field_validator("metric")
    @classmethod
    def _metric_is_known(cls, value: str) -> str:
        return _known_metric(value)


class ObjectiveSpec(_MetricSpec):
    direction: Literal["minimize", "maximize"] | None = None  # default: the metric's own

    def resolved_direction(self) -> str:
        from ditplan.evaluators.base import METRIC_DIRECTIONS

        return self.direction or METRIC_DIRECTIONS[self.metric]


class ConstraintSpec(_MetricSpec):
    """A feasibility bound on a metric, e.g. ``{metric: rel_l1, max: 0.1}`` (Optuna: value ≤ 0 is feasible)."""

    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _one_bound(self) -> ConstraintSpec:
        if (self.max is None) == (self.min is None):
            raise ValueError("a constraint needs exactly one of max and min")
        return self

    def violation(self, value: float) -> float:
        return value - self.max if self.max is not None else self.min - value  # type: ignore[operator]


class SparseSpaceSpec(_Strict):
    """SparseDiT choices of a search. networks: fine-tuned networks (``ditplan finetune-sparse``) a plan
    may run on, as folders relative to the model's (``auto``: every one found under its ``sparse/``);
    running on none is always a choice. pool_layers: Poolingformer bottom-layer counts for plans on
    the pretrained weights. curves: pruning-curve families for plans on a network, their rates drawn
    inside the range the network was trained for."""

    networks: Literal["auto"] | list[str] = "auto"
    pool_layers: list[int] = [0, 1, 2]
    curves: list[str] = ["constant", "paper", "linear", "cosine", "step"]


class SpaceSpec(_Strict):
    """methods: strategies a (layer group × step segment) cell may take. layer_groups / step_segments:
    a count of even pieces or explicit cut points (1 per layer / per step = the full grid).
    params: narrower choices for strategy parameters, e.g. ``{wars: {window_size: [16, 32]}}``.
    sparse: SparseDiT choices joined to the attention choices (none: attention strategies only)."""

    methods: list[str] = ["full", "ast", "wars", "asc", "wars+asc"]
    layer_groups: int | list[int] = 3
    step_segments: int | list[int] = 4
    params: dict[str, dict[str, list[Any]]] = {}
    sparse: SparseSpaceSpec | None = None


class RefineSpec(_Strict):
    """Multi-fidelity: after the search, the Pareto front is re-evaluated on more samples with the
    expensive metrics (e.g. domain FID, measured latency), sequentially on the driver so timings do
    not contend; results go to a second study ``<name>-refined`` beside the first."""

    metrics: list[str] = ["rel_l1", "latency_ratio"]
    samples: int = Field(20, gt=0)
    latency_repeats: int = Field(3, gt=0)

    @field_validator("metrics")
    @classmethod
    def _metrics_are_known(cls, value: list[str]) -> list[str]:
        return [_known_metric(m) for m in value]


class SearchSpec(_Strict):
    """sampler: tpe (default), nsga2, gp or random, seeded by ``seed``. trials: evaluated trials per
    study (warm-start plans not counted). workers: Ray tasks in flight. samples: the first K workload
    samples every trial is judged on. reference_point: hypervolume reference in objective units
    (default: dense cost, and the worst quality seen). storage: an Optuna RDB URL for several drivers
    (default: a journal file in the run directory). tracking_uri: MLflow (default: SQLite in the run
    directory). gpus_per_trial: Ray GPUs per trial (1 on a GPU cluster). refine: re-evaluate the
    front with expensive metrics (multi-fidelity); none skips it."""

    sampler: Literal["tpe", "nsga2", "gp", "random"] = "tpe"
    population_size: int = Field(50, ge=2)  # NSGA-II generation size
    trials: int = Field(30, gt=0)
    workers: int = Field(2, gt=0)
    seed: int = 0
    samples: int = Field(10, gt=0)
    objectives: list[ObjectiveSpec] = [ObjectiveSpec(metric="rel_l1"), ObjectiveSpec(metric="flops_ratio")]
    constraints: list[ConstraintSpec] = []
    space: SpaceSpec = SpaceSpec()
    reference_point: list[float] | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    gpus_per_trial: float = Field(0.0, ge=0)
    max_retries: int = Field(2, ge=0)
    refine: RefineSpec | None = None

    @model_validator(mode="after")
    def _reference_fits(self) -> SearchSpec:
        if self.reference_point is not None and len(self.reference_point) != len(self.objectives):
            raise ValueError(f"reference_point has {len(self.reference_point)} values for {len(self.objectives)} objectives")
        return self


class GreedySpec(_Strict):
    """DiTFastAttn's greedy search as run by ``ditplan run``: thresholds δ (D1 … D6 by default), the
    first K workload samples as calibration batch, the WA-RS window (default tokens // 8)."""

    thresholds: list[float] = [0.025, 0.05, 0.075, 0.1, 0.125, 0.15]
    calibration_samples: int = Field(8, gt=0)
    window_size: int | None = None


class ExperimentSpec(_Strict):
    name: str
    model: ModelSpec
    sampler: SamplerSpec = SamplerSpec()
    workload: WorkloadSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    search: SearchSpec = SearchSpec()
    greedy: GreedySpec = GreedySpec()
    output_dir: str = "runs/${name}"

    @model_validator(mode="after")
    def _workload_fits_model(self) -> ExperimentSpec:
        if self.model.kind == "dit" and self.workload.classes is None:
            raise ValueError("a dit model is class-conditional: give workload.classes")
        if self.model.kind == "pixart" and self.workload.prompts is None:
            raise ValueError("a pixart model is prompt-conditioned: give workload.prompts")
        return self

    def run_dir(self) -> Path:
        return Path(self.output_dir.replace("${name}", self.name))


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] == "missing" else f" = {value!r}"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    message = first["msg"].removeprefix("Value error, ")
    return f"{path}: {where}{shown}: {message}{extra}"


def load_spec(path: str | Path) -> ExperimentSpec:
    path = Path(path)
    if not path.exists():
        raise SpecError(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: an experiment file is a YAML mapping with name, model, sampler and workload")
    data = _resolve_paths(data, path.parent)
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_error(path, err)) from None


def _resolve_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative file paths in the model section are relative to the experiment file."""
    model = dict(data.get("model") or {})
    for key in ("prompt_embeddings",):
        if isinstance(model.get(key), str) and not Path(model[key]).is_absolute():
            model[key] = str(base / model[key])
    return {**data, "model": model} if "model" in data else data
