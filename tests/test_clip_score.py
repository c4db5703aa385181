import json
import string

import pytest
import torch

from ditplan.errors import UserError
from ditplan.evaluators.clip_score import ClipScorer


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP with a character-level tokenizer, saved like a downloaded checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    vocab = {c: i for i, c in enumerate(string.ascii_lowercase)}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(string.ascii_lowercase)})
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_clip_score_is_100_times_the_clipped_cosine(tiny_clip):
    scorer = ClipScorer(tiny_clip)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    prompts = ["a red circle", "a blue square"]
    metric = scorer.score(images, prompts)
    pixels = list(((images + 1) * 127.5).round().to(torch.uint8))
    inputs = scorer.processor(text=prompts, images=pixels, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert metric.value == pytest.approx(float(100 * cosine.clamp(min=0).mean()), rel=1e-5)
    assert metric.direction == "maximize" and 0 <= metric.value <= 100


def test_missing_clip_weights_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="CLIP weights folder .* not found"):
        ClipScorer(tmp_path / "nowhere")
