"""Domain quality of samples as an experiment defines it, in one place for search trials, the held-out
evaluation and ``ditplan evaluate``: FID/KID (and KID on the low-level layer where the extractor has
one) with the extractor the experiment names against its reference, whose statistics torch-fidelity
computes once and caches under ``<cache_dir>/fidelity`` by content hash, on the experiment's device;
digit class agreement only where the digit extractor applies (the ``digits`` extractor and a
class-conditional model of 10 classes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ditplan.errors import UserError
from ditplan.evaluators.base import Metric
from ditplan.files import check_folder, readable_file
from ditplan.registry import unknown_name
from ditplan.spec import DIGITS_REFERENCE, ExperimentSpec

DISTRIBUTION = ("fid", "kid", "kid_low", "isc", "prc")  # torch-fidelity's (isc: IS, prc: precision/recall)
DOMAIN_METRICS = frozenset({*DISTRIBUTION, "class_agreement"})
DIGIT_CLASSES = 10


def reference_images(spec: ExperimentSpec) -> torch.Tensor | str:
    """The real images distribution metrics compare with (``evaluation.reference``)."""
    reference = spec.evaluation.reference
    if reference == DIGITS_REFERENCE:
        from ditplan.models.digits import load_digits

        return load_digits("held_out")[0]
    if reference is None or not Path(reference).is_dir():
        raise UserError(f"evaluation.reference {reference!r} is neither '{DIGITS_REFERENCE}' nor a folder of images")
    return reference


def check_extractor(spec: ExperimentSpec) -> None:
    """Refuse, before any work, a feature extractor torch-fidelity does not know."""
    extractor = spec.evaluation.feature_extractor
    if extractor:
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

        import ditplan.evaluators.distribution  # noqa: F401  (registers the digit extractor)

        if extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise unknown_name("feature extractor", extractor, list(FEATURE_EXTRACTORS_REGISTRY),
                               "evaluation.feature_extractor")


def check_evaluation_files(spec: ExperimentSpec) -> None:
    """Refuse, before any work, extractor weights, a reference, CLIP or LPIPS weights that do not exist."""
    evaluation = spec.evaluation
    if evaluation.feature_extractor_weights_path:
        readable_file(evaluation.feature_extractor_weights_path, "evaluation.feature_extractor_weights_path file", 1 << 40)
    if evaluation.reference and evaluation.reference != DIGITS_REFERENCE:
        check_folder(evaluation.reference, "evaluation.reference folder")
    if evaluation.clip_weights_path:
        check_folder(evaluation.clip_weights_path, "evaluation.clip_weights_path folder")
    if evaluation.lpips_weights_path:
        from ditplan.evaluators.lpips import check_lpips_weights

        check_lpips_weights(evaluation.lpips_weights_path)


def class_agreement_applies(spec: ExperimentSpec, num_classes: int | None) -> bool:
    """The digit classifier judges only digits: the ``digits`` extractor on a 10-class workload."""
    return (spec.evaluation.feature_extractor == "digits" and spec.workload.classes is not None
            and num_classes == DIGIT_CLASSES)


def applicable_metrics(spec: ExperimentSpec, num_classes: int | None) -> list[str]:
    """The domain metrics an experiment gets by default: FID, KID and KID-low (where the extractor has a
    low-level layer) with an extractor, class agreement where it applies."""
    from ditplan.evaluators.distribution import LOW_LEVEL_LAYERS

    extractor = spec.evaluation.feature_extractor
    wanted = [m for m in ("fid", "kid", "kid_low") if extractor and (m != "kid_low" or extractor in LOW_LEVEL_LAYERS)]
    return wanted + (["class_agreement"] if class_agreement_applies(spec, num_classes) else [])


def domain_metrics(
    spec: ExperimentSpec, images: torch.Tensor, conditions: Sequence[Any], num_classes: int | None,
    metrics: Sequence[str] | None = None, reference: torch.Tensor | str | None = None,
) -> list[Metric]:
    """``metrics`` (default: all that apply) of ``images`` (N, C, H, W) in [-1, 1] drawn for ``conditions``;
    ``reference``: the real images when the caller holds them (default: ``evaluation.reference``).
    A metric that cannot apply to this experiment is a :class:`UserError` saying why."""
    from ditplan.evaluators.distribution import class_agreement, distribution_metrics

    extractor = spec.evaluation.feature_extractor
    agreement = class_agreement_applies(spec, num_classes)
    wanted = applicable_metrics(spec, num_classes) if metrics is None else [m for m in metrics if m in DOMAIN_METRICS]
    if not extractor and wanted:
        raise UserError(f"{wanted[0]} needs evaluation.feature_extractor (and evaluation.reference)")
    if "class_agreement" in wanted and not agreement:
        raise UserError("class_agreement needs the digits extractor on a class-conditional model of "
                        f"{DIGIT_CLASSES} classes; this experiment has {extractor!r} and {num_classes} classes")
    out: list[Metric] = []
    distribution = tuple(m for m in wanted if m in DISTRIBUTION)
    if distribution:
        if reference is None:
            reference = reference_images(spec)
        out += distribution_metrics(images, reference, extractor=extractor,
                                    weights_path=spec.evaluation.feature_extractor_weights_path, metrics=distribution,
                                    cache_dir=Path(spec.evaluation.cache_dir) / "fidelity",
                                    device=spec.model.torch_device())
    if "class_agreement" in wanted:
        out.append(Metric("class_agreement", class_agreement(images, torch.tensor(list(conditions))), "maximize"))
    return out
