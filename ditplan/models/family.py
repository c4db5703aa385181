"""What a model family is to ditplan, and the registry of families.

A family is one module (``ditplan.models.families.<name>``): a :class:`ModelAdapter` subclass,
registered with :func:`register_family`, that declares how its models load (transformer class, the
schedule of a random model), the stock pipelines a plan runs in and how each batches classifier-free
guidance, its blocks and where their self-attention lives, its conditioning and its FLOP model. An
adapter instance owns one loaded model: the transformer, its noise-schedule config, the optional VAE and
the conditioning. The rest of ditplan reaches a family only through this interface, so adding one
touches one file; a third party adds one in a module given to ``--plugin``.

Nothing here knows a strategy.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention

from ditplan.errors import UserError
from ditplan.files import read_tensors
from ditplan.models.identity import NetworkIdentity
from ditplan.registry import SCHEDULERS, Registry

if TYPE_CHECKING:
    from ditplan.spec import ExperimentSpec, ModelSpec

# how a stock pipeline runs guidance: classifier-free guidance as one call on a batch whose conditional half
# comes first or second (see ditplan.models.context.CFG_ORDERS), as two calls per step (the conditional one
# first), or a guidance-distilled model that takes the scale as an input (one call per step; with true CFG on top,
# FLUX.1's, two calls as well)
CfgMode = Literal["cond-uncond", "uncond-cond", "two-calls", "distilled"]
TWO_CALL_MODES: tuple[CfgMode, ...] = ("two-calls", "distilled")  # where guidance, when on, is two calls per step


@dataclass(frozen=True)
class BlockPattern:
    """How a block takes and returns its token streams (a block-caching cell replaces it stream by stream).

    inputs: the names of the stream arguments, the first also taken positionally (``hidden_states``);
    outputs: the order in which the block returns them as a tuple; None: it returns the first stream alone.
    A block may return None for a stream it ends (SD3's last block, for the text).
    """

    inputs: tuple[str, ...] = ("hidden_states",)
    outputs: tuple[str, ...] | None = None

    def streams_in(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        first, *rest = self.inputs
        streams = {first: args[0] if args else kwargs[first]}
        return {**streams, **{name: kwargs[name] for name in rest}}

    def streams_out(self, out: Any) -> dict[str, torch.Tensor]:
        """The streams a block returned (those it ended left out)."""
        if self.outputs is None:
            return {self.inputs[0]: out}
        return {name: x for name, x in zip(self.outputs, out) if x is not None}

    def pack(self, streams: Mapping[str, torch.Tensor]) -> Any:
        """What the block returns for ``streams`` (None for a stream not among them)."""
        return streams[self.inputs[0]] if self.outputs is None else tuple(streams.get(name) for name in self.outputs)


SINGLE_STREAM = BlockPattern()


@dataclass(frozen=True)
class Conditioning:
    """What the transformer is conditioned on, for a batch: ``cond`` and the null ``uncond`` (None for a
    guidance-distilled model without the empty prompt's embeddings, which its true CFG needs)."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor] | None

    def for_batch(self, cfg: bool) -> dict[str, torch.Tensor]:
        """Keyword arguments for one transformer call: ``[cond; uncond]`` halves when ``cfg``."""
        if not cfg:
            return self.cond
        if self.uncond is None:
            raise UserError("classifier-free guidance needs an unconditional input: a guidance-distilled model takes "
                            "sampler.guidance: embedded, and its true CFG (sampler.true_cfg_scale) the empty prompt's "
                            "embeddings ('')")
        return {k: torch.cat([self.cond[k], self.uncond[k]]) for k in self.cond}


def linear_flops(rows: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of a dense map of ``rows`` rows (multiply-adds counted as 2, as ``FlopCounterMode`` does)."""
    return 2 * rows * fan_in * fan_out


def timestep_embedding_flops(dim: int) -> int:
    """diffusers' TimestepEmbedding: 256-d sinusoid → dim → dim."""
    return linear_flops(1, 256, dim) + linear_flops(1, dim, dim)


def read_prompt_embeddings(path: str, prompts: Sequence[str], second: str, per_token: bool, unconditional: bool
                           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A safetensors file with ``<prompt>.embeds`` (L, D) and ``<prompt>.<second>`` per prompt: a vector, one entry
    per token when ``per_token`` (an attention mask (L,)); it must hold ``prompts`` (and, when
    ``unconditional``, the empty prompt "")."""
    what = "prompt embeddings file"
    tensors = read_tensors(path, what)
    out = {}
    for prompt in {key.rsplit(".", 1)[0] for key in tensors}:
        embeds, other = tensors.get(f"{prompt}.embeds"), tensors.get(f"{prompt}.{second}")
        fits = (embeds is not None and other is not None and embeds.ndim == 2 and other.ndim == 1
                and (not per_token or other.shape == embeds.shape[:1]))
        if not fits:
            raise UserError(f"{what} {path}: prompt {prompt!r} needs {prompt}.embeds (L, D) and {prompt}.{second} "
                            f"{'(L,)' if per_token else '(P,)'}")
        out[prompt] = (embeds, other)
    if len({e.shape for e, _ in out.values()}) > 1:
        raise UserError(f"{what} {path}: the prompts' embeddings differ in shape; pad them to one length")
    missing = [p for p in [*prompts, *([""] if unconditional else [])] if p not in out]
    if missing:
        needs = "every prompt of the workload and the empty prompt ''" if unconditional else "every prompt of the workload"
        raise UserError(f"{what} {path} has no embedding for the prompt {missing[0]!r}; it needs {needs}")
    return out


class ModelAdapter(abc.ABC):
    """A model family (class attributes and class methods) and one loaded model of it (an instance).

    Declared by each family:
    name: its ``model.kind``.
    transformer_class: the diffusers transformer class its models load as.
    scheduler_class: the diffusers scheduler whose default config a model without a ``scheduler/``
    folder (random weights) is sampled with.
    pipelines: the stock diffusers pipeline classes a plan runs in, each with its CFG batch layout.
    conditioning: ``classes`` (class labels) or ``prompts``; the workload field it needs.
    """

    name: ClassVar[str]
    transformer_class: ClassVar[type[torch.nn.Module]]
    scheduler_class: ClassVar[type]
    vae_class: ClassVar[type] = AutoencoderKL  # the VAE class its pipelines decode with (``model.vae``)
    pipelines: ClassVar[Mapping[type, CfgMode]]
    conditioning_kind: ClassVar[Literal["classes", "prompts"]]
    # how the experiment's guidance_scale acts (sampler.guidance): classifier-free guidance, or an input
    guidance_modes: ClassVar[tuple[str, ...]] = ("cfg",)
    # whether ditplan's attention strategies may work inside its self-attention (queries, keys, values); else
    # (joint attention) those that take the module as a whole (full, ast, asc), those that work on its attention
    # kernel (wars) and block caching run on it
    plan_attention: ClassVar[bool] = True
    flow_matching: ClassVar[bool] = False  # whether it samples with a flow-matching scheduler
    # the strategies a search space draws when the experiment names none (search.space.methods)
    default_methods: ClassVar[tuple[str, ...]] = ("full", "ast", "wars", "asc", "wars+asc")
    # the names of its blocks' attention modules (a regex matched in full, as diffusers' cache hooks match them)
    attention_names: ClassVar[str] = r"transformer_blocks\.\d+\.attn\d"

    def __init__(
        self,
        transformer: torch.nn.Module,
        scheduler_config: dict[str, Any],
        model_id: str,
        vae: torch.nn.Module | None = None,
        image_size: int | None = None,
    ) -> None:
        """``image_size``: pixels per side, for families that render any size (default: the transformer's
        ``sample_size`` latent pixels)."""
        self.transformer = transformer.eval().requires_grad_(False)
        self.image_size = image_size
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        # extra weights a strategy's network adds beside the transformer, set by the strategy that loads such a
        # network (frozen); part of the network's identity, moved and cast with it. None for a plain model
        self.merges: torch.nn.ModuleList | None = None

    @classmethod
    def pipeline_class(cls) -> type:
        """The family's main stock pipeline (the first it declares)."""
        return next(iter(cls.pipelines))

    @classmethod
    def two_calls(cls) -> bool:
        """Whether classifier-free guidance runs as two transformer calls per step (as the main pipeline runs it;
        ditplan's loop follows it: a guidance-distilled pipeline's true CFG does too), not as one call on a
        ``[cond; uncond]`` batch (also for a family without a pipeline)."""
        return next(iter(cls.pipelines.values()), None) in TWO_CALL_MODES

    guidance_argument: ClassVar[str] = "guidance_scale"  # the stock pipelines' argument for sampler.guidance_scale

    @classmethod
    def pipeline_guidance(cls, arguments: Mapping[str, Any], cfg_mode: CfgMode) -> tuple[float | None, bool, float]:
        """A stock pipeline call's guidance, from its bound arguments: (the scale it was given, or None; whether it
        runs classifier-free guidance; the true-CFG scale on top of distilled guidance, 1 without)."""
        scale = arguments.get(cls.guidance_argument)
        return scale, cfg_mode != "distilled" and scale is not None and float(scale) > 1.0, 1.0

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
        """The guided prediction from the conditional and unconditional ones (N, C, H, W), as the family's
        pipeline combines them."""
        return uncond + scale * (cond - uncond)

    # --- the family's structure, on any transformer of it (a plan is installed on bare transformers) ----
    @classmethod
    def blocks(cls, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The blocks a plan's layers are, in depth order."""
        return list(transformer.transformer_blocks)

    @classmethod
    def attention_of(cls, block: torch.nn.Module) -> Attention:
        """The self-attention module of one block."""
        return block.attn1

    @classmethod
    def block_pattern(cls, block: torch.nn.Module) -> BlockPattern:
        """How ``block`` takes and returns its token streams."""
        return SINGLE_STREAM

    @classmethod
    def block_probe(cls, block: torch.nn.Module) -> torch.nn.Module:
        """A module of ``block`` that runs exactly when the block computes (its feed-forward)."""
        return block.ff

    @classmethod
    def cross_attention_of(cls, block: torch.nn.Module) -> Attention | None:
        """The block's cross-attention to the text, or None."""
        return getattr(block, "attn2", None)

    @classmethod
    def pipeline_timestep(cls, t: float) -> float:
        """The timestep a stock pipeline passes its transformer at the scheduler's timestep ``t``."""
        return t

    # --- shape of the model --------------------------------------------------------------------
    text_tokens = 0  # tokens of the text a block cross-attends to (PixArt's prompt length; none for DiT)

    @property
    def num_layers(self) -> int:
        return len(self.blocks(self.transformer))

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: the VAE's downsampling, 1 without one."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def latent_size(self) -> int:
        if self.image_size is None:
            return self.transformer.config.sample_size
        return self.image_size // self.vae_scale_factor

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
        """The self-attention module of every block, in depth order."""
        return [self.attention_of(block) for block in self.blocks(self.transformer)]

    @cached_property
    def identity(self) -> NetworkIdentity:
        """The network's weights hash and cast hashes (taken on first use; dropped when the weights change)."""
        return NetworkIdentity(self.transformer, self.merges)

    @property
    def weights_hash(self) -> str:
        return self.identity.weights_hash

    @property
    def cast_hashes(self) -> dict[str, str]:
        """The weights' hash cast to each other half-precision dtype, which a plan records."""
        return self.identity.cast_hashes

    # --- what a family supplies -----------------------------------------------------------------
    @classmethod
    def check_spec(cls, spec: ExperimentSpec) -> None:
        """Refuse, in one line, an experiment whose model or workload settings this family cannot use."""
        field = "classes" if cls.conditioning_kind == "classes" else "prompts"
        if getattr(spec.workload, field) is None:
            raise UserError(f"a {cls.name} model is conditioned on {cls.conditioning_kind}: give workload.{field}")
        if spec.sampler.guidance not in cls.guidance_modes:
            raise UserError(f"sampler.guidance = {spec.sampler.guidance!r}: a {cls.name} model takes "
                            f"{' or '.join(map(repr, cls.guidance_modes))}")
        fits = [name for name, entry in SCHEDULERS.items() if entry.flow_matching == cls.flow_matching]
        if spec.sampler.scheduler not in fits:
            raise UserError(f"sampler.scheduler = {spec.sampler.scheduler!r} does not sample a {cls.name} model; "
                            f"choose one of {sorted(fits)}")

    @classmethod
    def estimate_size(cls, config: dict[str, Any]) -> tuple[int, int]:
        """(parameters, tokens) of a transformer built from ``config`` (the class's defaults filled in), roughly:
        a random model's config is checked against memory before it is built."""
        width = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        tokens = (int(config["sample_size"]) // int(config["patch_size"])) ** 2
        return int(config["num_layers"]) * 18 * width**2, tokens

    def set_timesteps(self, scheduler: Any, num_steps: int, device: torch.device) -> None:
        """Set ``scheduler``'s schedule for ``num_steps`` steps the way the family's stock pipeline does."""
        scheduler.set_timesteps(num_steps, device=device)

    @classmethod
    def load_kwargs(cls, spec: ModelSpec, conditions: Sequence[Any]) -> dict[str, Any]:
        """Extra adapter arguments an experiment's model section gives (e.g. prompt embeddings)."""
        return {}

    def check_conditions(self, conditions: Sequence[Any]) -> None:
        """Refuse, in one line, workload conditions the model does not know."""

    @abc.abstractmethod
    def conditioning(self, conditions: Sequence[Any], device: torch.device) -> Conditioning:
        """Turn a batch of workload conditions (class labels, prompts) into transformer inputs."""

    @abc.abstractmethod
    def _call_transformer(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        """One transformer forward; returns the raw output (N, C_out, H, W)."""

    @abc.abstractmethod
    def other_flops(self, text_tokens: int = 0, tokens: int | None = None, layer: int = 0) -> tuple[int, int]:
        """Analytic FLOPs of the parts no attention strategy changes, per sample: (per block ``layer``, once
        per forward). ``tokens``: the block's token count when it runs on fewer tokens (default all)."""

    def joint_attention_flops(self, layer: int, text_tokens: int, pairs: int | None = None) -> int:
        """FLOPs of block ``layer``'s joint attention per sample (``plan_attention`` False): its projections, and
        the scores and weighted sums of ``pairs`` (query, key) pairs (default all of the joint sequence's)."""
        raise NotImplementedError(f"the {self.name} family's attention FLOPs come from the attention strategies")

    def cross_attention_block_flops(self, text_tokens: int, tokens: int | None = None) -> int:
        """FLOPs of one block's cross-attention to the text tokens, per sample (0 without one)."""
        return 0

    def block_modulation_flops(self) -> int:
        """FLOPs of one block's own conditioning modulation, per sample (0 when the family shares one)."""
        return 0

    # --- shared behaviour -----------------------------------------------------------------------
    def predict(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The model prediction (ε, v or flow) with any learned-variance channels dropped, as float32: the
        transformer computes in its own dtype, the sampler in float32."""
        out = self._call_transformer(latents.to(self.dtype), timestep.expand(latents.shape[0]), inputs)
        return out[:, : self.latent_channels].float()  # (N, C, H, W)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents → images in [-1, 1] (un-scaled and, for VAEs with one, un-shifted as their pipelines do);
        pixel-space models return the latents unchanged."""
        if self.vae is None:
            return latents
        config = self.vae.config
        vae_dtype = next(self.vae.parameters()).dtype
        shift = getattr(config, "shift_factor", None)
        latents = latents / config.scaling_factor + (shift if shift is not None else 0.0)
        return self.vae.decode(latents.to(vae_dtype)).sample.float()

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ModelAdapter:
        """Move the transformer, VAE and merges to ``device`` (and cast them to ``dtype`` when given: the
        weights hash is that of the weights as they compute, so a plan made in bfloat16 names bfloat16 weights)."""
        for module in (self.transformer, self.vae, self.merges):
            if module is not None:
                same = dtype is None or next(module.parameters()).dtype == dtype
                module.to(device) if same else module.to(device, dtype)  # NOTE: diffusers warns at every cast
        if dtype is not None:
            self.__dict__.pop("identity", None)
        return self


class PromptFamily(ModelAdapter):
    """A prompt-conditioned family run from stored prompt embeddings (no text encoder needed).

    ``prompt_embeddings`` maps a prompt to ``(embeds (L, D), second)``, read from a safetensors file with
    ``<prompt>.embeds`` and ``<prompt>.<second_name>`` per prompt (and for the empty prompt "", the
    unconditional one, when the family runs CFG). Declared by each such family:
    second_name / second_input: the second tensor's key in the file and the transformer argument it feeds
    (PixArt's attention mask, FLUX's and SD3's pooled CLIP embedding); per_token: it has one entry per token
    (a mask, kept in its own dtype); unconditional: the family runs CFG, so the empty prompt is needed;
    encodes_prompts: ``model.text_encoder`` may stand in for the embeddings (the family encodes prompts).
    """

    conditioning_kind = "prompts"
    second_name: ClassVar[str]
    second_input: ClassVar[str]
    per_token: ClassVar[bool] = False
    unconditional: ClassVar[bool] = True
    encodes_prompts: ClassVar[bool] = False

    def __init__(self, *args: Any, prompt_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prompt_embeddings = dict(prompt_embeddings)

    @property
    def text_tokens(self) -> int:
        """Tokens of every prompt's embedding (L)."""
        return next(iter(self.prompt_embeddings.values()))[0].shape[0]

    @classmethod
    def read_embeddings(cls, path: str, prompts: Sequence[str] = ()) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The family's embeddings of ``prompts`` (and of the empty prompt when it runs CFG) from ``path``."""
        return read_prompt_embeddings(path, prompts, cls.second_name, cls.per_token, cls.unconditional)

    @classmethod
    def check_spec(cls, spec: ExperimentSpec) -> None:
        super().check_spec(spec)
        if not (spec.model.prompt_embeddings or cls.encodes_prompts and spec.model.text_encoder):
            alternative = " or model.text_encoder" if cls.encodes_prompts else ""
            raise UserError(f"a {cls.name} model needs model.prompt_embeddings (a safetensors file with <prompt>.embeds "
                            f"and <prompt>.{cls.second_name} per prompt){alternative}")

    @classmethod
    def load_kwargs(cls, spec: ModelSpec, conditions: Sequence[Any]) -> dict[str, Any]:
        """The prompts' embeddings, from the file or (a family that encodes prompts) ``model.text_encoder``."""
        prompts = [str(c) for c in conditions]
        if spec.prompt_embeddings:
            embeddings = cls.read_embeddings(spec.prompt_embeddings, prompts)
        else:
            embeddings = cls.encode_prompts(spec.text_encoder, prompts)
        return {"prompt_embeddings": embeddings, "image_size": spec.image_size}

    @classmethod
    def encode_prompts(cls, source: str, prompts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``prompts`` (and the empty one) encoded with the text encoders at ``source`` (``encodes_prompts``)."""
        raise NotImplementedError(f"the {cls.name} family runs from model.prompt_embeddings only")

    def conditioning(self, conditions: Sequence[Any], device: torch.device) -> Conditioning:
        """The prompts' embeddings, and the empty prompt's as the unconditional input where the family runs CFG
        (or, for a guidance-distilled one, where they are given: true CFG)."""
        unconditional = self.unconditional or "" in self.prompt_embeddings
        needed = [*conditions, *([""] if unconditional else [])]
        missing = [p for p in needed if p not in self.prompt_embeddings]
        if missing:
            raise UserError(f"no prompt embedding for {missing[0]!r}; give embeddings for every prompt"
                            f"{' and for the empty prompt' if self.unconditional else ''} (model.prompt_embeddings in "
                            "the experiment file)")

        def stack(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
            embeds = torch.stack([self.prompt_embeddings[p][0] for p in prompts]).to(device, self.dtype)
            second = torch.stack([self.prompt_embeddings[p][1] for p in prompts])
            second = second.to(device) if self.per_token else second.to(device, self.dtype)
            return {"encoder_hidden_states": embeds, self.second_input: second}

        return Conditioning(stack(list(conditions)), stack([""] * len(conditions)) if unconditional else None)


def text_pipeline(pipeline_class: type, source: str) -> Any:
    """The stock pipeline at ``source`` with its text encoders and tokenizers only (no transformer, no VAE); a
    folder that lacks them or a hub id that cannot be fetched is one line naming ``model.text_encoder``."""
    try:
        return pipeline_class.from_pretrained(source, transformer=None, vae=None)
    except (OSError, ValueError, TypeError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"model.text_encoder {source!r}: cannot load a {pipeline_class.__name__}'s text encoders (not a "
                        f"complete local folder, and not on a reachable hub): {first.strip()}") from None


# an MMDiT block takes the image and the text stream and returns them text first (None for a text stream it ends)
JOINT_STREAMS = BlockPattern(("hidden_states", "encoder_hidden_states"), ("encoder_hidden_states", "hidden_states"))


class JointAttentionFamily(PromptFamily):
    """A flow-matching MMDiT (FLUX, SD3, Qwen-Image): joint attention over image and text tokens in each block's
    ``attn``, blocks that take and return both streams, conditioned on text embeddings and a second tensor (FLUX's
    and SD3's pooled CLIP embedding, Qwen-Image's padding mask).
    On joint attention run ``full``, AST, ASC, WA-RS (its window over the image tokens, through the attention
    kernel of the family's own processor), block caching and diffusers' caches; ``wars+asc``, pooling and
    SparseDiT do not. Its sampling uses its stock pipeline's own code (schedule, latent packing),
    which needs transformers (``pip install 'ditplan[text]'``)."""

    second_name = "pooled"
    second_input = "pooled_projections"
    flow_matching = True
    plan_attention = False
    text_first: ClassVar[bool] = True  # the text tokens come before the image's in the joint sequence
    default_methods = ("full", "ast", "wars", "asc", "reuse", "forecast")
    attention_names = r"transformer_blocks\.\d+\.attn"

    @classmethod
    def attention_of(cls, block: torch.nn.Module) -> Attention:
        return block.attn

    @classmethod
    def cross_attention_of(cls, block: torch.nn.Module) -> Attention | None:
        return None  # the text takes part in the joint attention

    encodes_prompts = True

    @classmethod
    def encode_prompts(cls, source: str, prompts: Sequence[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each prompt and the empty one (the unconditional prompt of CFG, also FLUX.1's true CFG) through the text
        encoders of the pipeline folder or hub id ``source``, with that pipeline's own ``encode_prompt``:
        ``(embeds (L, D), pooled (P,))``."""
        pipe = text_pipeline(cls.pipeline_class(), source)
        with torch.no_grad():
            return {prompt: cls.encode_one(pipe, prompt) for prompt in dict.fromkeys([*prompts, ""])}

    @classmethod
    def encode_one(cls, pipe: Any, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt through ``pipe.encode_prompt``: its embeddings (L, D) and pooled embedding (P,)."""
        raise NotImplementedError

    @classmethod
    def check_spec(cls, spec: ExperimentSpec) -> None:
        if importlib.util.find_spec("transformers") is None:
            raise UserError(f"a {cls.name} model samples with its diffusers pipeline's code, which needs transformers: "
                            "pip install 'ditplan[text]'")
        super().check_spec(spec)

    @classmethod
    def block_pattern(cls, block: torch.nn.Module) -> BlockPattern:
        return JOINT_STREAMS


class PackedLatentFamily(JointAttentionFamily):
    """A joint-attention family whose pipeline packs the latents in 2 × 2 patches (the transformer sees
    (N, tokens, 4C)), passes it timestep / 1000 and shifts the flow schedule by the image's token count (FLUX.1,
    Qwen-Image); ``image_size`` must give an even number of latent pixels per side."""

    default_image_size: ClassVar[int] = 1024

    def __init__(self, *args: Any, image_size: int | None = None, **kwargs: Any) -> None:
        image_size = image_size or self.default_image_size
        super().__init__(*args, image_size=image_size, **kwargs)
        if self.latent_size % 2 or self.latent_size < 2:
            raise UserError(f"model.image_size = {image_size} gives {self.latent_size} latent pixels per side; a "
                            f"{self.name} model packs them in 2 × 2 patches: give a size that makes an even count")

    @classmethod
    def pipeline_timestep(cls, t: float) -> float:
        return t / 1000  # the pipeline passes timestep / 1000 (the transformer multiplies it back)

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4  # 2 × 2 patches are packed into the channels

    @property
    def num_tokens(self) -> int:
        return (self.latent_size // 2) ** 2

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) → (N, H/2 · W/2, 4C), with the pipeline's own ``_pack_latents``."""
        n, c, h, w = latents.shape
        return self.pipeline_class()._pack_latents(latents, n, c, h, w)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(N, H/2 · W/2, 4C) → (N, C, H, W), with the pipeline's own ``_unpack_latents`` (Qwen-Image's adds a
        frame axis, dropped here)."""
        side = self.latent_size
        return self.pipeline_class()._unpack_latents(packed, side, side, 1).reshape(packed.shape[0], -1, side, side)

    def set_timesteps(self, scheduler: Any, num_steps: int, device: torch.device) -> None:
        """The pipeline's schedule: sigmas from 1 to 1/N, shifted by the image's token count (``mu``), with the
        pipeline module's own ``calculate_shift`` and ``retrieve_timesteps``."""
        module = importlib.import_module(self.pipeline_class().__module__)
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = module.calculate_shift(self.num_tokens, config.get("base_image_seq_len", 256),
                                    config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                    config.get("max_shift", 1.15))
        module.retrieve_timesteps(scheduler, num_steps, device, sigmas=sigmas, mu=mu)


FAMILIES: Registry[type[ModelAdapter]] = Registry("model family")


def register_family(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make a family known by its ``name`` (``model.kind``)."""
    return FAMILIES.register(cls.name, cls)


def family_of(transformer: torch.nn.Module) -> type[ModelAdapter]:
    """The family of a diffusers transformer: the one whose transformer class is nearest to its own (a
    subclass's family before its base's); another class is one line naming the families."""
    by_class = {family.transformer_class: family for family in FAMILIES.values()}
    for cls in type(transformer).__mro__:
        if cls in by_class:
            return by_class[cls]
    known = ", ".join(f"{f.transformer_class.__name__} ({name})" for name, f in sorted(FAMILIES.items()))
    raise UserError(f"ditplan has no model family for {type(transformer).__name__}; it knows {known}. Add one in a "
                    "module that registers it (ditplan.models.family.register_family) and pass it to --plugin")


def pipeline_family(pipe: Any) -> tuple[type[ModelAdapter], CfgMode]:
    """The family and CFG batch layout of a stock pipeline (by its class, or the class it was made from)."""
    names = {cls.__name__ for cls in type(pipe).__mro__}
    for family in FAMILIES.values():
        for pipeline, cfg in family.pipelines.items():
            if pipeline.__name__ in names:
                return family, cfg
    known = sorted(p.__name__ for f in FAMILIES.values() for p in f.pipelines)
    raise UserError(f"ditplan runs plans in {known}, not {type(pipe).__name__}; apply the plan to its transformer and "
                    "tell the steps with ditplan.denoising_step")
