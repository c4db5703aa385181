"""LPIPS fidelity to dense: torch-fidelity's own VGG16 LPIPS, read from a local weights folder.

The weights folder is built here, in torch.hub's layout, from random values under the keys torch-fidelity's
``SampleSimilarityLPIPS`` loads (its ``lin0..4`` heads) and torchvision's VGG16 (its backbone): real
weights cannot be downloaded, and these exercise the same code on the same shapes."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from torch_fidelity.sample_similarity_lpips import SampleSimilarityLPIPS

from ditplan.cli import main
from ditplan.errors import UserError
from ditplan.evaluators.lpips import CHECKPOINTS, lpips
from ditplan.evaluators.measure import quality
from ditplan.spec import SpecError, load_spec

DATA = Path(__file__).parent / "data"
LIN_CHANNELS = (64, 128, 256, 512, 512)  # torch-fidelity's SampleSimilarityLPIPS.chns


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A torch hub folder holding both checkpoints LPIPS reads, with random values: the linear heads
    (``lin<i>.model.1.weight``, behind a dropout at index 0) and VGG16's conv layers at He scale; VGG16's
    classifier, which LPIPS drops, as one stored zero broadcast to its shape (the file stays ~60 MB)."""
    folder = tmp_path_factory.mktemp("lpips")
    (folder / "checkpoints").mkdir()
    g = torch.Generator().manual_seed(0)
    lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LIN_CHANNELS)}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in torchvision.models.vgg16().state_dict().items()}
    vgg = {}
    for key, shape in shapes.items():
        if key.startswith("features") and key.endswith("weight"):
            vgg[key] = torch.randn(shape, generator=g) * math.sqrt(2 / (shape[1] * 9))
        else:
            vgg[key] = torch.zeros(1).expand(shape)
    lin_name, vgg_name = CHECKPOINTS  # torch-fidelity's heads, then torchvision's VGG16
    torch.save(lin, folder / "checkpoints" / lin_name)
    torch.save(vgg, folder / "checkpoints" / vgg_name)
    return folder


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identical_samples_score_exactly_zero(weights):
    x = _images(3, 0)
    assert lpips(x, x, weights) == 0.0


def test_different_samples_score_above_zero_the_same_both_ways(weights):
    x, y = _images(3, 0), _images(3, 1)
    value = lpips(x, y, weights)
    assert value > 0 and math.isfinite(value)
    assert lpips(y, x, weights) == value


def test_the_value_is_the_mean_of_torch_fidelitys_per_sample_lpips(weights):
    x, y = _images(6, 2), _images(6, 3)  # more than one batch of pairs
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(weights))
    try:
        library = SampleSimilarityLPIPS("lpips-vgg16")
    finally:
        torch.hub.set_dir(previous)
    with torch.no_grad():
        per_sample = library(((x + 1) * 127.5).round(), ((y + 1) * 127.5).round())  # its input: 0–255 RGB
    assert per_sample.shape == (6,)
    assert lpips(x, y, weights) == pytest.approx(per_sample.mean().item(), rel=1e-6)


def test_grey_samples_are_compared_as_rgb(weights):
    x, y = _images(2, 4)[:, :1], _images(2, 5)[:, :1]
    assert lpips(x, y, weights) == pytest.approx(lpips(x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1), weights))


def test_quality_computes_lpips_where_the_weights_are_set_and_it_is_asked_for(tiny_adapter, tiny_spec, weights):
    x, y = _images(2, 6), _images(2, 7)
    with_weights = tiny_spec.model_copy(update={"evaluation": tiny_spec.evaluation.model_copy(
        update={"lpips_weights_path": str(weights)})})
    assert quality(tiny_adapter, with_weights, x, y, [1, 2], ["lpips"])["lpips"] == lpips(x, y, weights)
    assert "lpips" not in quality(tiny_adapter, with_weights, x, y, [1, 2], ["rel_l1"])
    assert "lpips" not in quality(tiny_adapter, tiny_spec, x, y, [1, 2], None)  # no weights: skipped


def test_a_missing_or_broken_weights_folder_is_one_line_naming_the_fix(weights, tmp_path):
    x = _images(1, 0)
    with pytest.raises(UserError, match="evaluation.lpips_weights_path folder .* does not exist"):
        lpips(x, x, tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(weights, partial)
    lin_name, vgg_name = CHECKPOINTS
    (partial / "checkpoints" / vgg_name).unlink()
    with pytest.raises(UserError) as missing:
        lpips(x, x, partial)
    assert f"has no checkpoints/{vgg_name}; download {CHECKPOINTS[vgg_name]} into" in str(missing.value)
    shutil.copy(weights / "checkpoints" / vgg_name, partial / "checkpoints")
    (partial / "checkpoints" / lin_name).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError) as broken:
        lpips(x, x, partial)
    assert "are not torch-fidelity's LPIPS weights" in str(broken.value) and CHECKPOINTS[lin_name] in str(broken.value)
    assert "\n" not in str(missing.value) + str(broken.value)


def _experiment(tmp_path: Path, evaluation: dict, **search) -> Path:
    data = yaml.safe_load((DATA / "tiny-dit.yaml").read_text())
    data.update(evaluation=evaluation, search=search, output_dir=str(tmp_path / "run"))
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("search", [{"refine": {"metrics": ["lpips"]}},
                                    {"objectives": [{"metric": "lpips"}, {"metric": "flops_ratio"}]},
                                    {"constraints": [{"metric": "lpips", "max": 0.2}]}])
def test_an_experiment_asking_for_lpips_without_weights_is_refused_in_one_line(search, tmp_path):
    path = _experiment(tmp_path, {}, **search)
    with pytest.raises(SpecError) as refused:
        load_spec(path)
    assert "metric lpips needs evaluation.lpips_weights_path: set it to a local folder" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_ditplan_run_refuses_lpips_without_weights_or_with_a_missing_folder_before_any_work(tmp_path, capsys):
    for evaluation, expected in (({}, "metric lpips needs evaluation.lpips_weights_path"),
                                 ({"lpips_weights_path": "no-such-folder"},
                                  "evaluation.lpips_weights_path folder")):
        path = _experiment(tmp_path, evaluation, refine={"metrics": ["lpips"]})
        with pytest.raises(SystemExit) as exit_:
            main(["run", "--experiment", str(path)])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and "\n" not in err and expected in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment.yaml"]  # no run directory


def test_evaluate_reports_lpips_with_weights_and_notes_it_skipped_without(weights):
    from ditplan.evaluators.evaluate import evaluate_plan
    from ditplan.models.adapters import adapter_from_spec

    data = {"name": "digits", "model": {"kind": "dit", "source": "embedded", "device": "cpu"},
            "sampler": {"num_steps": 2, "batch_size": 2}, "workload": {"classes": [3]},
            "evaluation": {"latency_repeats": 1}}
    spec = load_spec(data)
    adapter = adapter_from_spec(spec.model)
    with pytest.warns(UserWarning, match="lpips skipped: set evaluation.lpips_weights_path"):
        assert "lpips" not in evaluate_plan(spec, adapter, None, samples=2)
    data["evaluation"]["lpips_weights_path"] = str(weights)
    results = evaluate_plan(load_spec(data), adapter, None, samples=2)
    assert (results["lpips"][0].value, results["lpips"][1].value) == (0.0, 0.0)  # dense against itself
    assert results["lpips"][0].direction == "minimize"
