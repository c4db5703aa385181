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


def test_low_level_kid_sees_texture_that_leaves_the_digit_classes_alone():
    digits = load_digits("held_out")[0]
    samples, reference = digits[:200:2], digits[1:200:2]  # same classes, different digits
    textured = (samples + 0.25 * torch.sign(torch.randn_like(samples, generator=torch.Generator().manual_seed(0)))).clamp(-1, 1)
    clean = {m.name: m.value for m in distribution_metrics(samples, reference, metrics=("kid", "kid_low"))}
    noisy = {m.name: m.value for m in distribution_metrics(textured, reference, metrics=("kid", "kid_low"))}
    assert set(clean) == {"kid", "kid_low"}
    assert noisy["kid_low"] > 10 * max(clean["kid_low"], 1e-3)


def test_held_out_rounds_cover_the_set_in_order_in_near_equal_parts():
    from ditplan.evaluators.measure import rounds
    from ditplan.spec import SeedSet

    seed_set = SeedSet("held_out", list(range(10)), list(range(100, 110)))
    parts = rounds(seed_set, 3)
    assert [len(seeds) for _, seeds in parts] == [3, 4, 3]
    assert [s for _, seeds in parts for s in seeds] == seed_set.seeds
    assert [c for conditions, _ in parts for c in conditions] == seed_set.conditions


def test_held_out_metrics_of_dense_itself_are_exact(tiny_adapter, tiny_spec, tmp_path):
    from ditplan.evaluators.measure import DENSE, measure
    from ditplan.models.sampling import plan_target
    from ditplan.plan import Plan

    spec = tiny_spec.model_copy(update={"search": tiny_spec.search.model_copy(
        update={"refine": tiny_spec.search.refine.model_copy(update={"samples": 6, "latency_repeats": 3})})})
    uniform = Plan.uniform(plan_target(tiny_adapter, spec.sampler.settings()))
    result = measure(tiny_adapter, spec, {"uniform": uniform}, spec.seed_set("held_out"), timed=True, rounds_count=3)
    assert result.seed_set.seeds == spec.seed_set("held_out").seeds
    for name in (DENSE, "uniform"):
        values = result.metrics[name]
        assert values["rel_l1"] == 0.0 and values["flops_ratio"] == 1.0
        assert values["latency_ratio_min"] <= values["latency_ratio"] <= values["latency_ratio_max"]
    assert result.metrics[DENSE]["latency_ratio"] == 1.0
    assert result.sample_forwards == 2 * (6 + 2) * 2 * spec.sampler.num_steps  # 2 runs × (6 + 2 warm-up) × CFG × steps
