"""One domain-metric function for trials, held-out and `ditplan evaluate`: metrics that fit the model."""

from __future__ import annotations

import pytest
import torch

from ditplan.errors import UserError
from ditplan.evaluators.domain import applicable_metrics, class_agreement_applies, domain_metrics
from ditplan.models.digits import load_digits
from ditplan.spec import ExperimentSpec, load_spec
from tests.conftest import DATA


def _spec(tmp_path, extractor: str | None = "digits", **search) -> ExperimentSpec:
    spec = load_spec(DATA / "tiny-dit.yaml")
    evaluation = {"cache_dir": str(tmp_path / "cache")}
    if extractor:
        evaluation |= {"feature_extractor": extractor, "reference": "digits-held-out"}
    return ExperimentSpec.model_validate({**spec.model_dump(), "evaluation": evaluation, "search": search})


def test_class_agreement_only_where_the_digit_extractor_applies(tmp_path):
    digits = _spec(tmp_path)
    assert class_agreement_applies(digits, 10)
    assert not class_agreement_applies(digits, 1000)  # an ImageNet DiT: the digit classifier does not apply
    assert not class_agreement_applies(_spec(tmp_path, "inception-v3-compat"), 10)
    assert applicable_metrics(digits, 10) == ["fid", "kid", "kid_low", "class_agreement"]
    assert applicable_metrics(digits, 1000) == ["fid", "kid", "kid_low"]
    assert applicable_metrics(_spec(tmp_path, None), 10) == []
    with pytest.raises(UserError, match="class_agreement needs the digits extractor"):
        domain_metrics(digits, torch.zeros(2, 3, 64, 64), [1, 2], 1000, ["class_agreement"])
    with pytest.raises(UserError, match="fid needs evaluation.feature_extractor"):
        domain_metrics(_spec(tmp_path, None), torch.zeros(2, 1, 16, 16), [1, 2], 10, ["fid"])


def test_an_experiment_asking_for_a_metric_that_cannot_apply_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metric fid needs evaluation.feature_extractor"):
        _spec(tmp_path, None, refine={"metrics": ["fid"], "samples": 8})
    with pytest.raises(ValueError, match="class_agreement needs the digits extractor"):
        _spec(tmp_path, "inception-v3-compat", objectives=[{"metric": "class_agreement"}, {"metric": "flops_ratio"}])


@pytest.mark.slow  # extracts the features of every held-out digit once (≈ 30 s on 2 shared cores)
def test_reference_statistics_are_computed_once_and_cached_by_content(tmp_path):
    spec = _spec(tmp_path)
    images, labels = load_digits("held_out")
    images, labels = images[:64], labels[:64].tolist()
    first = {m.name: m.value for m in domain_metrics(spec, images, labels, 10, ["fid", "class_agreement"])}
    cached = sorted(p.name for p in (tmp_path / "cache" / "fidelity").iterdir())
    assert any(name.startswith("ref-digits-") for name in cached)
    again = {m.name: m.value for m in domain_metrics(spec, images, labels, 10, ["fid", "class_agreement"])}
    assert again == first and sorted(p.name for p in (tmp_path / "cache" / "fidelity").iterdir()) == cached
    assert first["class_agreement"] > 0.9  # real digits: the classifier agrees with their labels


def test_a_reference_folder_is_cached_by_its_files_not_its_name(tmp_path):
    import os
    import shutil

    from ditplan.evaluators.distribution import folder_hash

    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        (real / f"{i}.png").write_bytes(bytes([i]) * 10)
    shutil.copytree(real, tmp_path / "moved")  # same files (copy2 keeps their times) under another name
    assert folder_hash(real) == folder_hash(tmp_path / "moved")
    before = folder_hash(real)
    (real / "1.png").write_bytes(b"another image")
    os.utime(real / "1.png", ns=(1, 1))
    assert folder_hash(real) != before
