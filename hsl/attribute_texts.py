"""Shopper-style training queries written from a product's attribute columns.

Titles are written by sellers ("Nike Men Black Shoe"); shoppers type what they see ("black casual
shoes for men"). Beside each title, training also pairs every photo with a text made of its own
attribute values: the configured columns in order, each but the last kept by a coin toss per epoch,
lower-cased and joined ("men black casual shoes", "black shoes"). The last column (the product's
kind, e.g. articleType) is always kept: a query that names only a colour matches half the catalog.

Many products share such a text, so in the loss every product of the batch that has all the values a
text names counts as a match of it, never as a negative (`false_negatives`).
"""

from __future__ import annotations

import functools

import torch

from .masks import token_mask


class AttributeTexts:
    """The attribute texts of N products: every variant encoded once by the store's text backbone."""

    def __init__(self, attributes: dict[str, list[str]], columns: list[str], backbone: str,
                 max_text_tokens: int, precision: str = "auto") -> None:
        self.columns = [c for c in columns if c in attributes]  # a store without a column writes without it
        n = len(next(iter(attributes.values()))) if attributes and self.columns else 0  # no column: no texts
        values = [[attributes[c][i].strip() for c in self.columns] for i in range(n)]
        # codes [N,C]: equal codes = equal values, -1 = missing (matches nothing, is never named)
        known: dict[str, int] = {}
        self.codes = torch.tensor([[known.setdefault(v.lower(), len(known)) if v else -1 for v in row]
                                   for row in values], dtype=torch.long).reshape(n, len(self.columns))
        self.variants = 1 << max(0, len(self.columns) - 1)  # subsets of the optional columns
        # kept [V,C]: the columns variant v names, bit c of v for the optional ones, the last always
        self.kept = torch.tensor([[bool(v >> c & 1) for c in range(len(self.columns) - 1)] + [True]
                                  for v in range(self.variants)], dtype=torch.bool).reshape(self.variants, -1)
        strings: dict[str, int] = {}
        self.text_of = torch.tensor([[strings.setdefault(_text(row, self.kept[v].tolist()), len(strings))
                                      for v in range(self.variants)] for row in values],
                                    dtype=torch.long).reshape(n, self.variants)  # [N,V] index into the encoded texts
        self.tokens, self.mask = _encode(tuple(strings), backbone, max_text_tokens, precision) if strings else \
            (torch.zeros(0, 1, 0), torch.zeros(0, 1, dtype=torch.bool))

    def __bool__(self) -> bool:
        return bool(self.columns) and len(self.codes) > 0

    def draw(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A text for each product of the batch: (tokens [B,T,Dt] float, mask [B,T] bool, false negatives
        [B,B] bool: True where product j has every value that text i names, j != i)."""
        return self.batch(index, torch.randint(self.variants, (len(index),), generator=generator))

    def batch(self, index: torch.Tensor, variant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`draw` with the variant of each product's text given ([B] int: bit c keeps optional column c)."""
        texts = self.text_of[index, variant]  # [B]
        codes = self.codes[index]  # [B,C]
        named = self.kept[variant] & (codes >= 0)  # [B,C]; a missing value is not in the text
        same = codes.unsqueeze(1) == codes.unsqueeze(0)  # [B(text),B(product),C]
        matches = (same | ~named.unsqueeze(1)).all(-1)  # [B,B]
        false_negatives = matches & ~torch.eye(len(index), dtype=torch.bool)
        mask = self.mask[texts]
        longest = int(mask.sum(1).max())
        return self.tokens[texts, :longest].float(), mask[:, :longest], false_negatives


def _text(row: list[str], kept: list[bool]) -> str:
    return " ".join(value.lower() for value, keep in zip(row, kept, strict=True) if keep and value)


@functools.lru_cache(maxsize=1)
def _encode(texts: tuple[str, ...], backbone: str, max_text_tokens: int, precision: str,
            chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """([U,T,Dt] float16 tokens, [U,T] bool mask) of every text, by the store's text backbone.

    The last call's result is kept: members of a config trained one after another in one process (on a
    GPU, or `member_processes` 1) on the same products would each encode the same texts again (3 s on
    the catalog). Read only."""
    from .backbones import create_text_encoder
    from .precision import resolve_precision

    # Building the encoder draws from torch's generator (its layers' initial weights, before the pretrained
    # ones load): forked, so a training draws the same whether the texts were cached or not.
    with torch.random.fork_rng(devices=[]):
        encoder = create_text_encoder(backbone, max_text_tokens=max_text_tokens)
    encoder.use_precision(resolve_precision(precision, "cpu"))
    tokens, lengths = [], []
    for start in range(0, len(texts), chunk):
        features = encoder.encode_texts(texts[start:start + chunk])
        tokens.append(features.tokens.half())
        lengths.append(features.lengths)
    width = max(t.shape[1] for t in tokens)
    tokens = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tokens])
    lengths = torch.cat(lengths)
    return tokens, token_mask(lengths, width)
