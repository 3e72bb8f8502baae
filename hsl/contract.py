"""The contract between a model and its training losses, as data.

Each loss class says what it reads of a training batch (`needs(config) -> Needs`); a model config
says what its model produces (`ModelConfig.produces() -> Produces`). hsl/losses.py compares the two
when a config is loaded, so a config whose losses ask for something the model never computes fails
there, in one line, instead of at the first training batch. The label columns and class-name
distances come from the training data, not the model: hsl/objectives.py checks those against the store.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Produces:
    """What a model computes for a batch of (title, photo) pairs."""

    granularities: tuple[str, ...]  # Similarities per level of these ("object", "image")
    vectors: bool = True  # index and query vectors (the one-inner-product index)
    encodings: bool = True  # the text and image encodings


@dataclass(frozen=True)
class Needs:
    """What a loss reads of a training batch (hsl/loss_batch.py's LossBatch)."""

    granularities: tuple[str, ...] = ()  # per-level Similarities of these granularities
    vectors: bool = False  # index and query vectors (SGML / HUSE on the "total" embedding)
    encodings: bool = False  # the text and image encodings (SGML / HUSE on the "deepest" embedding)
    labels: tuple[str, ...] = ()  # label columns of the training products
    class_distances: bool = False  # HUSE: the distances between the class names

    def __or__(self, other: Needs) -> Needs:
        return Needs(tuple(dict.fromkeys(self.granularities + other.granularities)), self.vectors or other.vectors,
                     self.encodings or other.encodings, tuple(dict.fromkeys(self.labels + other.labels)),
                     self.class_distances or other.class_distances)

    def missing(self, model: Produces, loss: str) -> list[tuple[str, str]]:
        """(what is missing, what to change) for each need of the model's part that it does not produce;
        `loss` is the loss's name in the config, for the advice."""
        out = [(f"the {g} similarities", f'add "{g}" to the config\'s "granularities", or take it out of '
                                         f'"{loss}": {{"granularities": [...]}}')
               for g in self.granularities if g not in model.granularities]
        if self.vectors and not model.vectors:
            out.append(("the index and query vectors", 'give the loss "embedding": "deepest"'))
        if self.encodings and not model.encodings:
            out.append(("the text and image encodings", 'give the loss "embedding": "total"'))
        return out
