"""The data side of the extra objectives (SGML, HUSE): label vocabularies, class-name distances,
their heads' weights in a model folder, and the HUSE classifier's accuracy.

The heads are training-only: search loads `model.safetensors` alone. A model trained with a head
also gets `objectives.safetensors` (the heads' weights; the label vocabulary in its metadata), which
`hsl eval` reads to report the shared classifier's accuracy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import write_atomic
from .config import ModelConfig
from .dataset import Products
from .errors import HSLError, HSLUsageError
from .huse import HUSELoss, class_name_distances
from .loss_batch import LossBatch, loss_embeddings
from .losses import LossContext, build_losses

OBJECTIVES_FILE = "objectives.safetensors"


def build_context(config: ModelConfig, products: Products, backbone: str) -> LossContext:
    """Label vocabularies from the training products and, for HUSE, the class-name distances."""
    weights: dict[str, float] = {}
    if "sgml" in config.losses:
        weights = dict(config.sgml.attributes) or {column: 1.0 for column in products.attributes}
        if not weights:
            raise HSLUsageError(f"config {config.name!r}: the sgml loss needs attribute columns; the store has none")
    columns = list(weights) + ([config.huse.class_column] if "huse" in config.losses else [])
    vocab = {}
    for column in columns:
        if column not in products.attributes:
            raise HSLUsageError(f"config {config.name!r}: column {column!r} is not a store column "
                                f"(the store has {', '.join(products.attributes) or 'none'})")
        vocab[column] = sorted({value for value in products.attributes[column] if value})  # "" = missing
        if not vocab[column]:
            raise HSLUsageError(f"config {config.name!r}: column {column!r} has no values in the training split")
    distances = None
    if "huse" in config.losses:
        distances = class_name_distances(encode_class_names(backbone, vocab[config.huse.class_column]))
    return LossContext(vocab, weights, distances)


def encode_class_names(backbone: str, names: list[str]) -> torch.Tensor:
    """[K,D] sentence embeddings of the class names by the store's text backbone."""
    from .backbones import create_text_encoder

    # Loading a backbone may draw from the global RNG (weight init before loading): keep the seed's stream.
    with torch.random.fork_rng(devices=[]):
        return create_text_encoder(backbone).encode_texts(names).sentence.detach().float().cpu()


def encode_labels(attributes: dict[str, list[str]], vocab: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """column -> [N] long index into vocab[column]; -1 for a missing or unseen value."""
    out = {}
    for column, values in vocab.items():
        index = {value: i for i, value in enumerate(values)}
        out[column] = torch.tensor([index.get(value, -1) for value in attributes[column]], dtype=torch.long)
    return out


def head_parameters(losses: dict[str, nn.Module]) -> list[nn.Parameter]:
    return [p for loss in losses.values() for p in loss.parameters()]


def heads_state(losses: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Flat {"sgml.head.weight": ...} of every loss with weights or buffers; empty for HSL alone."""
    return {f"{name}.{key}": value for name, loss in losses.items() for key, value in loss.state_dict().items()}


def load_heads_state(losses: dict[str, nn.Module], tensors: dict[str, torch.Tensor], source: str) -> None:
    for name, loss in losses.items():
        own = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(f"{name}.")}
        try:
            loss.load_state_dict(own)
        except RuntimeError as error:
            raise HSLError(f"{source}: the {name} head does not fit the config ({str(error).splitlines()[0]}); "
                           "train the model again") from None


def save_heads(out_dir: Path, losses: dict[str, nn.Module], context: LossContext) -> None:
    """Write out_dir/objectives.safetensors atomically when any loss has weights."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in heads_state(losses).items()}
    if not tensors:
        return
    metadata = {"vocab": json.dumps(context.vocab), "attribute_weights": json.dumps(context.attribute_weights)}
    write_atomic(out_dir / OBJECTIVES_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_heads(model_dir: str | os.PathLike, config: ModelConfig) -> tuple[dict[str, nn.Module], LossContext] | None:
    """(loss modules with trained heads, context) from a model folder; None when it has no heads."""
    path = Path(model_dir) / OBJECTIVES_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        context = LossContext(json.loads(metadata["vocab"]), json.loads(metadata["attribute_weights"]))
    except Exception as error:  # safetensors raises its own types for truncated or foreign files
        raise HSLError(f"{path} is not a readable objectives file ({error}); train the model again") from None
    if "huse" in config.losses:
        size = len(context.vocab.get(config.huse.class_column, []))
        context.class_distances = torch.zeros(size, size)  # placeholder, replaced by the saved buffer
    losses = {k: v for k, v in build_losses(config, context).items() if heads_state({k: v})}
    load_heads_state(losses, tensors, str(path))
    return losses, context


@torch.no_grad()
def classification_accuracy(model: nn.Module, huse: HUSELoss, products: Products, classes: list[str],
                            device: torch.device, block: int = 256) -> dict[str, float]:
    """{"acc_image", "acc_text"}: share of products (with a class) that the shared classifier gets right.

    A class never seen in training counts as an error: the classifier cannot name it."""
    model.eval()
    labels = encode_labels(products.attributes, {huse.class_column: classes})[huse.class_column]  # [N]
    known = torch.tensor([bool(v) for v in products.attributes[huse.class_column]])  # [N]
    if not known.any():
        return {}
    correct = {"acc_image": 0, "acc_text": 0}
    for start in range(0, len(products), block):
        index = torch.arange(start, min(start + block, len(products)))
        text = model.encode_text(*products.text_batch(index, device))
        image = model.encode_image(*products.image_batch(index, device))
        batch = LossBatch(index, text=text, image=image, index_vectors=model.index_vectors(image),
                          query_vectors=model.query_vectors(text))
        image_emb, text_emb = loss_embeddings(batch, huse.embedding)  # [B,D] each
        wanted, keep = labels[index].to(device), known[index].to(device)
        for name, embedding in (("acc_image", image_emb), ("acc_text", text_emb)):
            correct[name] += int(((huse.logits(embedding).argmax(dim=1) == wanted) & keep).sum())
    return {name: count / int(known.sum()) for name, count in correct.items()}
