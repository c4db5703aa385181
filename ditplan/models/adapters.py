"""Model adapters: one interface over class-conditional DiT and prompt-conditioned PixArt.

An adapter owns the transformer, the noise-schedule config, the optional VAE and the conditioning.
It loads through diffusers' ``from_pretrained`` (a local folder in pipeline layout or a hub id) or
builds a random-weight model from a config dict (tests).
"""

from __future__ import annotations

import abc
import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
)
from diffusers.models.attention_processor import Attention
from safetensors.torch import load_file

from ditplan.errors import UserError
from ditplan.files import check_folder, read_tensors
from ditplan.models.embedded import EMBEDDED_MODELS
from ditplan.models.identity import cast_hashes, network_hash
from ditplan.plan import Plan, PlanError

if TYPE_CHECKING:
    from ditplan.spec import ExperimentSpec, ModelSpec


@dataclass(frozen=True)
class Conditioning:
    """What the transformer is conditioned on, for a batch: ``cond`` and the null ``uncond``."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]

    def for_batch(self, cfg: bool) -> dict[str, torch.Tensor]:
        """Keyword arguments for one transformer call: ``[cond; uncond]`` halves when ``cfg``."""
        if not cfg:
            return self.cond
        return {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}


class ModelAdapter(abc.ABC):
    """A diffusers transformer + its scheduler config + VAE, seen the way ditplan needs it."""

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler_config: dict[str, Any],
        model_id: str,
        vae: AutoencoderKL | None = None,
        merges: torch.nn.ModuleList | None = None,
    ) -> None:
        self.transformer = transformer.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        # SDTM merge weights of a fine-tuned SparseDiT network (ditplan finetune-sparse), else None
        self.merges = merges.eval().requires_grad_(False) if merges is not None else None

    # --- shape of the model --------------------------------------------------------------------
    text_tokens = 0  # tokens of the text a block cross-attends to (PixArt's prompt length; none for DiT)

    @property
    def num_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def latent_size(self) -> int:
        return self.transformer.config.sample_size

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // self.transformer.config.patch_size) ** 2

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer computes in (``model.dtype``); latents and the scheduler stay float32."""
        return next(self.transformer.parameters()).dtype

    @property
    def hidden_dim(self) -> int:
        return self.transformer.config.num_attention_heads * self.transformer.config.attention_head_dim

    def self_attention_layers(self) -> list[Attention]:
        """The self-attention module (``attn1``) of every block, in depth order."""
        return [block.attn1 for block in self.transformer.transformer_blocks]

    @cached_property
    def weights_hash(self) -> str:
        return network_hash(self.transformer, self.merges)

    @cached_property
    def cast_hashes(self) -> dict[str, str]:
        """The weights' hash cast to each other half-precision dtype, which a plan records; taken on first use."""
        return cast_hashes(self.transformer, self.merges)

    # --- what a subclass supplies ---------------------------------------------------------------
    @abc.abstractmethod
    def conditioning(self, conditions: Sequence[Any], device: torch.device) -> Conditioning:
        """Turn a batch of workload conditions (class labels, prompts) into transformer inputs."""

    @abc.abstractmethod
    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        """One transformer forward; returns the raw output (N, C_out, H, W)."""

    # --- shared behaviour -----------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The model prediction (ε or v) with any learned-variance channels dropped, as float32: the
        transformer computes in its own dtype, the sampler in float32."""
        out = self._call_transformer(latents.to(self.dtype), timestep.expand(latents.shape[0]), inputs)
        return out[:, : self.latent_channels].float()  # (N, C, H, W)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1]; pixel-space models return the latents unchanged."""
        if self.vae is None:
            return latents
        vae_dtype = next(self.vae.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor).sample.float()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelAdapter:
        """Move the transformer, VAE and merges to ``device`` (and cast them to ``dtype`` when given: the
        weights hash is that of the weights as they compute, so a plan made in bfloat16 names bfloat16 weights)."""
        for module in (self.transformer, self.vae, self.merges):
            if module is not None:
                same = dtype is None or next(module.parameters()).dtype == dtype
                module.to(device) if same else module.to(device, dtype)  # NOTE: diffusers warns at every cast
        if dtype is not None:
            self.__dict__.pop("weights_hash", None)
            self.__dict__.pop("cast_hashes", None)
        return self


class DiTAdapter(ModelAdapter):
    """Class-conditional DiT; the null class (CFG) is the extra row of the label table."""

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_embeds_ada_norm

    def conditioning(self, conditions: Sequence[Any], device: torch.device) -> Conditioning:
        labels = torch.tensor([int(c) for c in conditions], device=device)
        null = torch.full_like(labels, self.num_classes)
        return Conditioning({"class_labels": labels}, {"class_labels": null})

    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        return self.transformer(latents, timestep=timestep, class_labels=inputs["class_labels"]).sample


class PixArtAdapter(ModelAdapter):
    """Prompt-conditioned PixArt; runs offline from prompt embeddings + attention masks.

    ``prompt_embeddings`` maps a prompt to ``(embeds (L, D), mask (L,))``; the empty prompt "" is the
    unconditional one. A user with the T5 encoder fills it with :meth:`encode_prompts`.
    """

    def __init__(self, *args: Any, prompt_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.prompt_embeddings = dict(prompt_embeddings)

    @property
    def text_tokens(self) -> int:
        """Tokens of every prompt's embedding (L): the keys and values of each block's cross-attention."""
        return next(iter(self.prompt_embeddings.values()))[0].shape[0]

    def conditioning(self, conditions: Sequence[Any], device: torch.device) -> Conditioning:
        missing = [p for p in [*conditions, ""] if p not in self.prompt_embeddings]
        if missing:
            raise ValueError(
                f"no prompt embedding for {missing[0]!r}; give embeddings for every prompt and for the empty "
                "prompt '' (model.prompt_embeddings in the experiment file), or configure the T5 text encoder"
            )

        def stack(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
            embeds = torch.stack([self.prompt_embeddings[p][0] for p in prompts]).to(device, self.dtype)
            mask = torch.stack([self.prompt_embeddings[p][1] for p in prompts]).to(device)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

        return Conditioning(stack(list(conditions)), stack([""] * len(conditions)))

    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            # NOTE: PixArt-α 1024 is conditioned on image size and aspect ratio, as in its pipeline.
            size = float(self.latent_size * 8)
            n = latents.shape[0]
            added = {
                "resolution": torch.tensor([[size, size]], device=latents.device).repeat(n, 1),
                "aspect_ratio": torch.tensor([[1.0]], device=latents.device).repeat(n, 1),
            }
        return self.transformer(latents, timestep=timestep, added_cond_kwargs=added, **inputs).sample

    @staticmethod
    def encode_prompts(source: str, prompts: Sequence[str], max_length: int = 300) -> dict:
        """Encode prompts with the pipeline's T5 encoder (needs ``ditplan[text]`` and the weights)."""
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise ImportError("encoding prompts needs the transformers package: pip install 'ditplan[text]'") from None

        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        encoder = T5EncoderModel.from_pretrained(source, subfolder="text_encoder").eval()
        out = {}
        for prompt in [*prompts, ""]:
            tokens = tokenizer(prompt, max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
            with torch.no_grad():
                embeds = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0][0]
            out[prompt] = (embeds, tokens.attention_mask[0])
        return out


ADAPTERS: dict[str, tuple[type[ModelAdapter], type[torch.nn.Module]]] = {
    "dit": (DiTAdapter, DiTTransformer2DModel),
    "pixart": (PixArtAdapter, PixArtTransformer2DModel),
}


def load_adapter(
    kind: str,
    source: str | None = None,
    config: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
    vae: str | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    **adapter_kwargs: Any,
) -> ModelAdapter:
    """Load a model: ``source`` is ``"embedded"``, a local pipeline folder or a hub id (weights under
    ``transformer/``, schedule under ``scheduler/``); or ``config`` builds random weights (seeded).
    ``dtype``: loaded in it (diffusers' ``torch_dtype``); default as stored, float32 for random weights."""
    adapter_cls, transformer_cls = ADAPTERS[kind]
    if config is not None:
        transformer = random_transformer(transformer_cls, config, seed)
        model_id = f"random-{kind}"
        base_schedule: dict[str, Any] = DDPMScheduler().config
    elif source is not None:
        if source not in EMBEDDED_MODELS and _looks_local(source):
            check_folder(source, "model.source folder", names=list(EMBEDDED_MODELS))
        path = str(model_folder(source))
        transformer = load_transformer(transformer_cls, Path(path), dtype)
        base_schedule = _from_pretrained(DDPMScheduler.load_config, path, "scheduler", "model.source")
        model_id = source
        adapter_kwargs.setdefault("merges", load_merges(Path(path), transformer))
    else:
        raise ValueError("a model needs a source (a folder, a hub id or 'embedded') or a config dict; give one")
    schedule = {**base_schedule, **(scheduler_config or {})}
    vae_model = _from_pretrained(AutoencoderKL.from_pretrained, vae, "vae", "model.vae", low_cpu_mem_usage=False,
                                 **_torch_dtype(dtype)) if vae else None
    return adapter_cls(transformer, schedule, model_id, vae=vae_model, **adapter_kwargs)


def recorded_adapter(model_id: str) -> ModelAdapter | None:
    """The model a plan records (``target.model``) when it is on this machine: an embedded model's name or a
    local pipeline folder; None for a hub id or random weights (nothing is downloaded)."""
    if model_id in EMBEDDED_MODELS:
        return load_adapter("dit", model_id)
    config = Path(model_id) / "transformer" / "config.json"
    if not config.is_file():
        return None
    class_name = json.loads(config.read_text()).get("_class_name")
    kind = next((k for k, (_, cls) in ADAPTERS.items() if cls.__name__ == class_name), None)
    return load_adapter(kind, model_id) if kind else None


def model_folder(source: str) -> Path:
    """The local folder of a model source (an embedded model's name is the package's own folder)."""
    return EMBEDDED_MODELS[source].folder if source in EMBEDDED_MODELS else Path(source)


MAX_RANDOM_PARAMETERS = 20_000_000_000  # beyond any DiT or PixArt: a typo, not a model
MAX_TOKENS = 1 << 16  # PixArt 4K at patch 2 has 65,536 tokens


def random_transformer(transformer_cls: type[torch.nn.Module], config: dict[str, Any], seed: int) -> torch.nn.Module:
    """A transformer with random (seeded) weights built from ``config`` (``model.config``), once the config
    is known to name the class's own arguments and to fit in memory."""
    import inspect

    known = set(inspect.signature(transformer_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(f"model.config: {transformer_cls.__name__} has no argument {unknown[0]!r}; "
                        f"it takes {', '.join(sorted(known))}")
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise UserError(f"model.config.{key} = {value}: sizes and counts must be positive")
    defaults = {k: p.default for k, p in inspect.signature(transformer_cls.__init__).parameters.items()}
    get = {**defaults, **config}.get
    try:
        width = int(get("num_attention_heads")) * int(get("attention_head_dim"))
        parameters = int(get("num_layers")) * 18 * width**2
        tokens = (int(get("sample_size")) // int(get("patch_size"))) ** 2
    except (TypeError, ValueError):
        raise UserError("model.config: num_attention_heads, attention_head_dim, num_layers, sample_size and "
                        "patch_size must be whole numbers") from None
    if parameters > MAX_RANDOM_PARAMETERS or tokens > MAX_TOKENS:
        raise UserError(f"model.config describes a transformer of about {parameters:.3g} parameters and {tokens:,} "
                        f"tokens; at most {MAX_RANDOM_PARAMETERS:.3g} and {MAX_TOKENS:,}")
    torch.manual_seed(seed)
    try:
        return transformer_cls(**config)
    except (TypeError, ValueError, RuntimeError, AttributeError, ZeroDivisionError) as err:
        raise UserError(f"model.config does not build a {transformer_cls.__name__}: {' '.join(str(err).split())}") from None


def _looks_local(source: str) -> bool:
    """Whether a model source is meant as a local folder: it exists, or it is written as a path (a hub id
    is ``owner/name``)."""
    return Path(source).exists() or source.startswith((".", "/", "~")) or source.count("/") != 1


def _from_pretrained(load: Any, source: str, subfolder: str, field: str, **kwargs: Any) -> Any:
    """``load(source, subfolder=...)``; a folder that is missing or incomplete, or a hub id that cannot be
    fetched, is a one-line :class:`UserError` naming ``field``."""
    if _looks_local(source) and source not in EMBEDDED_MODELS:
        folder = check_folder(source, f"{field} folder")
        if not (folder / subfolder).is_dir():
            raise UserError(f"{field} folder {folder} has no {subfolder}/ subfolder; give a model folder in diffusers "
                            "pipeline layout (save_pretrained)")
    try:
        return load(source, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"{field} {source!r}: cannot load its {subfolder}/ (not a complete local folder, and not on a "
                        f"reachable hub): {first.strip()}") from None


MERGES_FILE = "sparse_merge.safetensors"
LAYOUT_FILE = "sparse_layout.yaml"


def new_merges(num_modules: int, dim: int) -> torch.nn.ModuleList:
    """The merge of each module at its start: ``up`` = identity, ``skip`` = zero."""
    merges = torch.nn.ModuleList()
    for _ in range(num_modules):
        merge = torch.nn.ModuleDict({"up": torch.nn.Linear(dim, dim, bias=False), "skip": torch.nn.Linear(dim, dim, bias=False)})
        with torch.no_grad():
            merge["up"].weight.copy_(torch.eye(dim))
            merge["skip"].weight.zero_()
        merges.append(merge)
    return merges


def load_merges(folder: Path, transformer: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The SDTM merges a fine-tuned SparseDiT folder carries (``ditplan finetune-sparse``), else None."""
    path = folder / MERGES_FILE
    if not path.exists():
        return None
    state = load_file(path)
    count = len({key.split(".")[0] for key in state})
    merges = new_merges(count, transformer.config.num_attention_heads * transformer.config.attention_head_dim)
    merges.load_state_dict(state)
    return merges


def load_for_plan(adapter: ModelAdapter, plan: Plan) -> ModelAdapter:
    """The model ``plan`` runs on: ``adapter`` itself, or the fine-tuned SparseDiT network the plan names
    in ``sparse.weights``."""
    weights = (plan.sparse or {}).get("weights")
    if not weights or adapter.merges is not None and adapter.weights_hash == plan.target.weights_hash:
        return adapter
    return load_sparse_network(adapter, weights)


def load_sparse_network(adapter: ModelAdapter, weights: str) -> ModelAdapter:
    """The fine-tuned SparseDiT network ``weights`` (a folder inside the base model's) as an adapter like
    ``adapter`` (same conditioning, schedule, VAE, device); loaded once per adapter."""
    networks = adapter.__dict__.setdefault("_sparse_networks", {})
    if weights not in networks:
        folder, transformer, merges = load_sparse_folder(type(adapter.transformer), model_folder(adapter.model_id), weights,
                                                         adapter.dtype)
        tuned = copy.copy(adapter)
        tuned.__dict__.pop("weights_hash", None)
        tuned.__dict__.pop("cast_hashes", None)
        tuned.__dict__.pop("_sparse_networks", None)
        tuned.transformer = transformer.eval().requires_grad_(False)
        tuned.merges = merges
        tuned.model_id = str(folder)
        networks[weights] = tuned.to(next(adapter.transformer.parameters()).device, adapter.dtype)
    return networks[weights]


def load_sparse_folder(transformer_cls: type[torch.nn.Module], base: Path, weights: str,
                       dtype: torch.dtype | None = None) -> tuple[Path, torch.nn.Module, torch.nn.ModuleList | None]:
    """The fine-tuned SparseDiT network ``weights`` inside the base model's folder ``base``: (its folder,
    its transformer in ``dtype``, its SDTM merges)."""
    folder = sparse_network_folder(base, weights)
    transformer = load_transformer(transformer_cls, folder, dtype)
    return folder, transformer, load_merges(folder, transformer)


def sparse_network_folder(base: Path, weights: str) -> Path:
    """The folder of the fine-tuned SparseDiT network a plan names (``sparse.weights``, relative to the base
    model's folder ``base``); a path that leaves ``base`` or holds no network is refused."""
    folder = (Path(base) / weights).resolve()
    if Path(weights).is_absolute() or not folder.is_relative_to(Path(base).resolve()):
        raise PlanError(f"plan's sparse.weights {weights!r} leaves the model folder {base}; a fine-tuned network must "
                        "lie inside it, e.g. sparse/p1-s1_5")
    if not (folder / "transformer").is_dir():
        raise PlanError(f"plan needs the fine-tuned SparseDiT network {weights!r}, but {folder} holds none; make it "
                        "with `ditplan finetune-sparse` for this model")
    return folder


def load_transformer(transformer_cls: type[torch.nn.Module], folder: Path, dtype: torch.dtype | None = None
                     ) -> torch.nn.Module:
    """The transformer of a model folder in diffusers layout (``<folder>/transformer``), in ``dtype``."""
    # NOTE: low_cpu_mem_usage needs accelerate (not a dependency); without it diffusers warns each load
    return _from_pretrained(transformer_cls.from_pretrained, str(folder), "transformer", "model.source",
                            low_cpu_mem_usage=False, **_torch_dtype(dtype))


def _torch_dtype(dtype: torch.dtype | None) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: none keeps diffusers' default (float32)."""
    return {} if dtype is None else {"torch_dtype": dtype}


def sparse_networks(base_folder: Path) -> dict[str, dict]:
    """The fine-tuned SparseDiT networks next to a base model: relative folder → its ``sparse_layout.yaml``."""
    out = {}
    for info in sorted((base_folder / "sparse").glob(f"*/{LAYOUT_FILE}")):
        out[str(info.parent.relative_to(base_folder))] = yaml.safe_load(info.read_text())
    return out


def read_prompt_embeddings(path: str, prompts: Sequence[str] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A safetensors file with ``<prompt>.embeds`` (L, D) and ``<prompt>.mask`` (L,) per prompt; it must
    hold ``prompts`` and the empty prompt."""
    what = "prompt embeddings file"
    tensors = read_tensors(path, what)
    out = {}
    for prompt in {key.rsplit(".", 1)[0] for key in tensors}:
        embeds, mask = tensors.get(f"{prompt}.embeds"), tensors.get(f"{prompt}.mask")
        if embeds is None or mask is None or embeds.ndim != 2 or mask.shape != embeds.shape[:1]:
            raise UserError(f"{what} {path}: prompt {prompt!r} needs {prompt}.embeds (L, D) and {prompt}.mask (L,)")
        out[prompt] = (embeds, mask)
    if len({e.shape for e, _ in out.values()}) > 1:
        raise UserError(f"{what} {path}: the prompts' embeddings differ in shape; pad them to one length")
    missing = [p for p in [*prompts, ""] if p not in out]
    if missing:
        raise UserError(f"{what} {path} has no embedding for the prompt {missing[0]!r}; it needs every prompt of the "
                        "workload and the empty prompt ''")
    return out


def adapter_from_spec(spec: ModelSpec, conditions: Sequence[Any] = ()) -> ModelAdapter:
    """Load the model an experiment file describes, on its device; ``conditions`` (every class label or
    prompt the workload draws) are checked against it."""
    kwargs: dict[str, Any] = {}
    if spec.kind == "pixart":
        prompts = [str(c) for c in conditions]
        if spec.prompt_embeddings:
            kwargs["prompt_embeddings"] = read_prompt_embeddings(spec.prompt_embeddings, prompts)
        else:
            kwargs["prompt_embeddings"] = PixArtAdapter.encode_prompts(spec.text_encoder, prompts)
    dtype = spec.torch_dtype()
    adapter = load_adapter(spec.kind, spec.source, spec.config, vae=spec.vae, seed=spec.seed,
                           dtype=None if spec.config is not None else dtype, **kwargs)
    check_classes(adapter, conditions)
    return adapter.to(spec.torch_device(), dtype)


_LOADED: dict[str, ModelAdapter] = {}


def experiment_adapter(spec: ExperimentSpec) -> ModelAdapter:
    """The experiment's model, loaded once per process (a Ray worker keeps it between trials), checked
    against the classes its workload draws."""
    key = json.dumps(spec.model.model_dump(), sort_keys=True)
    if key not in _LOADED:
        _LOADED[key] = adapter_from_spec(spec.model, spec.workload.all_conditions())
    check_classes(_LOADED[key], spec.workload.all_conditions())  # NOTE: another workload may share the model
    return _LOADED[key]


def check_classes(adapter: ModelAdapter, conditions: Sequence[Any]) -> None:
    """A class-conditional model refuses class labels it does not know (one line)."""
    if isinstance(adapter, DiTAdapter):
        bad = [c for c in conditions if not 0 <= int(c) < adapter.num_classes]
        if bad:
            raise UserError(f"workload.classes has {bad[0]}, but the model knows classes 0…{adapter.num_classes - 1}")


def _linear(rows: int, fan_in: int, fan_out: int) -> int:
    return 2 * rows * fan_in * fan_out


def _timestep_embedding_flops(dim: int) -> int:
    """diffusers' TimestepEmbedding: 256-d sinusoid → dim → dim."""
    return _linear(1, 256, dim) + _linear(1, dim, dim)


def _dit_other_flops(adapter: ModelAdapter, tokens: int) -> tuple[int, int]:
    """(per block of ``tokens`` tokens, once per forward) FLOPs of everything but self-attention, per sample."""
    c, n, cfg = adapter.hidden_dim, adapter.num_tokens, adapter.transformer.config
    p2 = cfg.patch_size**2
    # each block has its own AdaLayerNormZero: timestep embedding + modulation (C → 6C); MLP C → 4C → C
    per_block = _timestep_embedding_flops(c) + _linear(1, c, 6 * c) + _linear(tokens, c, 4 * c) + _linear(tokens, 4 * c, c)
    once = (
        _linear(n, p2 * cfg.in_channels, c)  # patch embedding (a strided conv)
        + _timestep_embedding_flops(c) + _linear(1, c, 2 * c)  # final modulation
        + _linear(n, c, p2 * adapter.transformer.out_channels)  # unpatchify projection
    )
    return per_block, once


def cross_attention_block_flops(adapter: ModelAdapter, text_tokens: int, tokens: int | None = None) -> int:
    """FLOPs of one block's cross-attention to the text tokens, per sample (0 for class-conditional DiT)."""
    if not isinstance(adapter, PixArtAdapter):
        return 0
    c = adapter.hidden_dim
    tokens = adapter.num_tokens if tokens is None else tokens
    return (
        _linear(tokens, c, c) + 2 * _linear(text_tokens, c, c) + _linear(tokens, c, c)  # q, k, v, out projections
        + 2 * 2 * tokens * text_tokens * c  # scores and weighted sum
    )


def _pixart_other_flops(adapter: ModelAdapter, text_tokens: int, tokens: int) -> tuple[int, int]:
    c, n, cfg = adapter.hidden_dim, adapter.num_tokens, adapter.transformer.config
    p2 = cfg.patch_size**2
    cross = cross_attention_block_flops(adapter, text_tokens, tokens)
    per_block = cross + _linear(tokens, c, 4 * c) + _linear(tokens, 4 * c, c)
    once = (
        _linear(n, p2 * cfg.in_channels, c)
        + _timestep_embedding_flops(c) + _linear(1, c, 6 * c)  # adaln_single
        + _linear(text_tokens, cfg.caption_channels, c) + _linear(text_tokens, c, c)  # caption projection
        + _linear(n, c, p2 * cfg.out_channels)
    )
    return per_block, once


def other_flops(adapter: ModelAdapter, text_tokens: int = 0, tokens: int | None = None) -> tuple[int, int]:
    """Analytic FLOPs of the parts no attention strategy changes, per sample: (per block, once per
    forward). ``tokens``: the block's token count when SDTM runs it on sparse tokens (default all)."""
    tokens = adapter.num_tokens if tokens is None else tokens
    if isinstance(adapter, PixArtAdapter):
        return _pixart_other_flops(adapter, text_tokens, tokens)
    return _dit_other_flops(adapter, tokens)


def sdtm_overhead_flops(adapter: ModelAdapter) -> int:
    """What one SDTM adds per sample and forward: the merge (two C×C maps on N tokens) and, in DiT, the
    second modulation of each end block (timestep embedding + C → 6C) that makes its keys/values."""
    c, n = adapter.hidden_dim, adapter.num_tokens
    modulation = 0 if isinstance(adapter, PixArtAdapter) else _timestep_embedding_flops(c) + _linear(1, c, 6 * c)
    return 2 * _linear(n, c, c) + 2 * modulation
