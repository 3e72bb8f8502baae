"""all-MiniLM-L6-v2 (a 6-layer BERT) as ~60 lines of torch, loaded from the installed package.

Why not transformers' BertModel? Importing it costs about 2 s on a 2-core machine, two thirds of
the 3 s budget of a cold `hsl query`. The forward here is the standard BERT encoder (post-norm,
exact GELU) with the same weights (safetensors) and the same tokenizer (the package's
tokenizer.json through the `tokenizers` library); tests/test_backbones.py checks that its token
states equal transformers' to 1e-5 on varied text.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int, inner: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.attention_out = nn.Linear(width, width)
        self.attention_norm = nn.LayerNorm(width, eps=eps)
        self.inner = nn.Linear(width, inner)
        self.out = nn.Linear(inner, width)
        self.out_norm = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: the real tokens only, packed [N,w] (N = mask.sum()); attention alone needs the padded [B,T] layout.

        Every other step works on one token at a time, so it runs on the N real tokens: titles in
        a batch of 32 average 10 tokens and pad to about 13.5, a third more work for nothing."""
        (b, t), w = mask.shape, x.shape[-1]
        q, k, v = (self._padded(proj(x), mask).view(b, t, self.heads, w // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # [B,H,T,w/H] each
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [B,H,T,w/H]
        attended = attended.transpose(1, 2).reshape(b, t, w)[mask]  # [N,w]
        x = self.attention_norm(x + self.attention_out(attended))  # [N,w]
        return self.out_norm(x + self.out(F.gelu(self.inner(x))))  # [N,w]

    @staticmethod
    def _padded(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[N,w] real tokens -> [B,T,w] with zeros at the padding (masked out of attention anyway)."""
        out = packed.new_zeros(*mask.shape, packed.shape[-1])
        out[mask] = packed
        return out


class MiniLM(nn.Module):
    """BERT encoder + tokenizer; `forward(texts)` -> (last hidden states [B,L,W], attention mask [B,L])."""

    def __init__(self, folder: str | Path, max_length: int = 128) -> None:
        super().__init__()
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        width, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], width)
        self.position = nn.Embedding(config["max_position_embeddings"], width)
        self.token_type = nn.Embedding(config["type_vocab_size"], width)
        self.embed_norm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(_Layer(width, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))
        self.load_state_dict(_rename(load_file(str(folder / "model.safetensors"))))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.eval()

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        x, mask = self.embed(texts)
        for layer in self.layers:
            x = layer(x, mask)  # [N,W]
        return _Layer._padded(x, mask), mask  # [B,L,W], zeros at the padding

    def embed(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the embedded real tokens, packed [N,W]; the attention mask [B,L]): the input of layers[0]."""
        encodings = self.tokenizer.encode_batch(texts)
        device = self.word.weight.device
        ids = torch.tensor([e.ids for e in encodings], device=device)  # [B,L]
        mask = torch.tensor([e.attention_mask for e in encodings], device=device).bool()  # [B,L]
        positions = torch.arange(ids.shape[1], device=device)[None]  # [1,L]
        x = self.embed_norm(self.word(ids) + self.position(positions) + self.token_type(torch.zeros_like(ids)))
        return x[mask], mask  # [N,W]: the real tokens, packed


def _rename(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face BERT names -> this module's names (the pooler is not used by sentence models)."""
    table = {"embeddings.word_embeddings": "word", "embeddings.position_embeddings": "position",
             "embeddings.token_type_embeddings": "token_type", "embeddings.LayerNorm": "embed_norm",
             "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
             "attention.output.dense": "attention_out", "attention.output.LayerNorm": "attention_norm",
             "intermediate.dense": "inner", "output.dense": "out", "output.LayerNorm": "out_norm"}
    renamed = {}
    for key, value in weights.items():
        if key.startswith("pooler.") or key.endswith("position_ids"):
            continue
        name = key.replace("encoder.layer.", "layers.")
        for old, new in table.items():
            name = name.replace(old, new)
        renamed[name] = value
    return renamed
