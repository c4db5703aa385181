"""ditplan's embedded digit DiT in a stock diffusers ``DiTPipeline``.

``DiTPipeline`` decodes with a VAE and hard-codes ImageNet's null class 1000 for guidance; the embedded
model works in pixel space and has 10 classes (its null class is row 10). :func:`embedded_pipeline`
builds the stock pipeline with a pass-through decoder and a hook that maps label 1000 to the model's
null class, so a plan can be run and timed through ``pipe(...)`` exactly as a user of a hub DiT would.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.autoencoders.vae import DecoderOutput

from ditplan.models.adapters import load_adapter
from ditplan.models.embedded import EMBEDDED_FAMILY
from ditplan.models.sampling import make_scheduler

IMAGENET_NULL_CLASS = 1000  # what DiTPipeline passes as the unconditional label
NULL_CLASS_HOOK = "ditplan_null_class"


class IdentityDecoder(torch.nn.Module):
    """A "VAE" for pixel-space models: ``decode`` returns the latents unchanged (scaling factor 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0)
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(): the pipeline asks our device

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def decode(self, latents: torch.Tensor, return_dict: bool = True) -> DecoderOutput:
        return DecoderOutput(sample=latents)


class NullClassHook(ModelHook):
    """Maps DiTPipeline's null label 1000 to the null class of a model with fewer classes."""

    def __init__(self, null_class: int) -> None:
        super().__init__()
        self.null_class = null_class

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        labels = kwargs.get("class_labels")
        if labels is not None:
            kwargs = {**kwargs, "class_labels": torch.where(labels == IMAGENET_NULL_CLASS, self.null_class, labels)}
        return args, kwargs


def embedded_pipeline(scheduler: str = "dpmsolver++", source: str = "embedded") -> DiffusionPipeline:
    """A stock ``DiTPipeline`` over a ditplan pixel-space digit DiT (default: the embedded one), with the
    sampler ``scheduler`` (a name in ``SAMPLERS``). Call it like any DiTPipeline, e.g.
    ``pipe(class_labels=[3, 7], num_inference_steps=20, guidance_scale=4.0, output_type="np")``."""
    adapter = load_adapter(EMBEDDED_FAMILY, source)
    transformer = adapter.transformer
    pipe = adapter.pipeline_class()(transformer=transformer, vae=IdentityDecoder(), scheduler=make_scheduler(adapter, scheduler))
    null_class = transformer.config.num_embeds_ada_norm
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(NullClassHook(null_class), NULL_CLASS_HOOK)
    return pipe
