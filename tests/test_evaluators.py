import math

import pytest
import torch

from ditplan.errors import UserError
from ditplan.evaluators.distribution import distribution_metrics
from ditplan.evaluators.fidelity import PSNR_CAP_DB, psnr, relative_l1, ssim
from ditplan.evaluators.reference import dense_reference
from ditplan.models.digits import load_digits


def test_identical_samples_score_perfectly():
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    assert relative_l1(x, x) == 0.0
    assert psnr(x, x) == PSNR_CAP_DB
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_relative_l1_follows_ditfastattn_definition():
    a, b = torch.tensor([1.0, -2.0, 0.0]), torch.tensor([0.5, -2.0, 4.0])
    # |a−b| / (max(|a|,|b|) + 1e-6), clipped to [0, 10], averaged
    expected = (0.5 / (1 + 1e-6) + 0 + 4 / (4 + 1e-6)) / 3
    assert relative_l1(a, b) == pytest.approx(expected)


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x + 0.2, x) == pytest.approx(10 * math.log10(4 / 0.04))


def test_fid_of_a_set_against_itself_is_zero_through_torch_fidelity(tmp_path):
    digits = load_digits("held_out")[0][:200]
    metrics = {m.name: m.value for m in distribution_metrics(digits, digits, metrics=("fid", "kid"), cache_dir=tmp_path)}
    assert abs(metrics["fid"]) < 1e-3
    assert abs(metrics["kid"]) < 0.05  # unbiased estimator: ≈ 0 up to subset noise
    shifted = {m.name: m.value for m in distribution_metrics(-digits, digits, metrics=("fid",), cache_dir=tmp_path)}
    assert shifted["fid"] > 100  # inverted digits are far from real ones
    assert any(p.name.startswith("ref-digits-") for p in tmp_path.iterdir())  # reference statistics cached


def test_a_missing_inception_weights_file_is_a_one_line_error(tmp_path):
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(UserError, match="Inception weights file .*not found; download") as info:
        distribution_metrics(x, x, extractor="inception-v3-compat", weights_path=str(tmp_path / "missing.pth"))
    assert "\n" not in str(info.value)


def test_the_dense_reference_is_computed_once_then_read_from_the_cache(tiny_adapter, tiny_spec, tmp_path):
    forwards = []
    hook = tiny_adapter.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    settings = tiny_spec.sampler.settings()
    conditions, seeds = tiny_spec.workload.conditions(), tiny_spec.workload.seeds()
    try:
        first = dense_reference(tiny_adapter, settings, conditions, seeds, tmp_path)
        computed = len(forwards)
        second = dense_reference(tiny_adapter, settings, conditions, seeds, tmp_path)
        other = dense_reference(tiny_adapter, settings, conditions, [s + 1 for s in seeds], tmp_path)
    finally:
        hook.remove()
    batches = -(-len(seeds) // settings.batch_size)
    assert computed == batches * settings.num_steps  # one forward per step per batch
    assert len(forwards) == 2 * computed  # the second call sampled nothing; other seeds did
    assert torch.equal(first, second) and not torch.equal(first, other)
