"""Model architectures as small JSON files (hsl/configs/*.json) read into a frozen dataclass.

Every size of the HSL network is a config value; ablations (one level, one granularity, the
dual-encoder baseline) are configs too, never code branches. A saved model's `config.json` is
the same dict plus a `meta` entry, so it also loads here (the `meta` entry is ignored).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .contract import Produces
from .errors import HSLUsageError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GRANULARITIES = ("object", "image")
AGGREGATIONS = ("mean", "max", "topk")
# Official HSL code (parser.py): Adam 2e-4, StepLR gamma 0.9 every epoch, grad-norm clip 2.0, batch 256.
# group_column / group_size: hard-negative batches of runs of one attribute value (hsl/batches.py); "" = random.
# text_columns / text_weight: training queries written from these attribute columns beside the titles, and
# the weight of their loss (hsl/attribute_texts.py); [] = titles only.
DEFAULT_TRAINING = {"lr": 2e-4, "lr_decay": 0.9, "grad_clip": 2.0, "batch_size": 256, "epochs": 10,
                    "weight_decay": 0.0, "group_column": "", "group_size": 0, "text_columns": [], "text_weight": 0.5,
                    "average_decay": 0.0, "val_fraction": 0.1}
# average_decay: keep an exponential moving average of the weights, decay per step (hsl/averaging.py); 0 = off.
# val_fraction: share of the non-test products that validates each epoch and picks the best one; 0 trains on
# them too and keeps the last epoch (hsl-members3: the sum of members is as good at its last epoch).


def _check_share(where: str, key: str, value: Any, high: float, high_included: bool, meaning: str) -> None:
    """A number from 0 to `high` (included or not), not a bool: a training setting that is a share or a decay."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value \
        and (value <= high if high_included else value < high)
    if not ok:
        interval = f"[0, {high:g}{']' if high_included else ')'}"
        raise HSLUsageError(f"{where}: {key} must be a number in {interval} ({meaning}), got {value!r}")


def _check_number(where: str, key: str, value: Any, positive: bool = False) -> None:
    """Non-negative (or positive) finite number, not a bool: JSON `true` must not pass as a weight."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise HSLUsageError(f"{where}: {key} must be a {'positive' if positive else 'non-negative'} number, "
                            f"got {value!r}")


# HEAD_SCALE_WHY: the heads read unit vectors and Adam moves each weight by about lr (2e-4) per step, so
# in a few hundred steps an unscaled linear head's logits stay within about +-1: a 60-way classifier
# could never become confident and its loss would barely fall. The multiplier lets them.
EMBEDDINGS = ("total", "deepest")


def _check_head(where: str, embedding: str, logit_scale: Any) -> None:
    if embedding not in EMBEDDINGS:
        raise HSLUsageError(f"{where}: embedding must be one of {list(EMBEDDINGS)}, got {embedding!r}")
    _check_number(where, "logit_scale", logit_scale, positive=True)


@dataclass(frozen=True)
class HSLLossConfig:
    """The "hsl" loss, the in-batch softmax over the per-level similarities (hsl/losses.py)."""

    granularities: tuple[str, ...] | None = None  # the granularities it trains; None: the model's
    # The weight of the other direction: each photo's softmax over the batch's texts (CLIP's symmetric
    # loss); 0 = the official HSL loss, texts over photos only.
    image_to_text: float = 0.0

    def check(self, where: str) -> None:
        _check_number(where, "hsl.image_to_text", self.image_to_text)
        chosen = self.granularities
        if chosen is not None and (not chosen or len(set(chosen)) != len(chosen)
                                   or any(g not in GRANULARITIES for g in chosen)):
            raise HSLUsageError(f"{where}, hsl: granularities must be distinct values of {list(GRANULARITIES)}, "
                                f"got {list(chosen)}")


@dataclass(frozen=True)
class SGMLConfig:
    """Semantic granularity metric learning (Manandhar, Bastan, Yap): see hsl/sgml.py for the maths."""

    # column -> weight in the attribute similarity g_ij; also the head's columns. Empty: every attribute
    # column of the store, weight 1 each.
    attributes: dict[str, float] = field(default_factory=dict)
    alpha: float = 2.0  # binomial deviance slope (Yi et al. 2014)
    beta: float = 0.5  # similarity at which a pair is undecided
    negative_cost: float = 25.0  # C: m_ij = -C for negatives
    attribute_weight: float = 1.0  # lambda: L = L_sbd + lambda * L_attr
    embedding: str = "total"  # what the loss shapes: "total" (index/query vectors) or "deepest" (v^L, q2^L)
    logit_scale: float = 10.0  # multiplier on the attribute head's logits (see HEAD_SCALE_WHY)

    def check(self, where: str) -> None:
        where = f"{where}, sgml"
        for column, weight in self.attributes.items():
            _check_number(where, f"attributes[{column!r}]", weight)
        if self.attributes and not sum(self.attributes.values()) > 0:
            raise HSLUsageError(f"{where}: attribute weights sum to 0; give at least one positive weight")
        for key in ("alpha", "negative_cost"):
            _check_number(where, key, getattr(self, key), positive=True)
        _check_number(where, "attribute_weight", self.attribute_weight)
        if not -1.0 <= self.beta <= 1.0:
            raise HSLUsageError(f"{where}: beta must lie in [-1, 1] (a cosine), got {self.beta!r}")
        _check_head(where, self.embedding, self.logit_scale)


@dataclass(frozen=True)
class HUSEConfig:
    """HUSE (Narayana et al. 2019): see hsl/huse.py for the maths."""

    class_column: str  # the attribute column whose values are the classes, e.g. articleType
    class_weight: float = 1.0  # a: shared-classifier cross-entropy
    graph_weight: float = 1.0  # b: semantic-graph loss
    gap_weight: float = 1.0  # c: image-text gap loss
    zeta: float = 0.5  # a pair enters the graph loss when both cosine distances are under zeta
    embedding: str = "total"  # what the loss shapes: "total" (index/query vectors) or "deepest" (v^L, q2^L)
    logit_scale: float = 10.0  # multiplier on the shared classifier's logits (see HEAD_SCALE_WHY)

    def check(self, where: str) -> None:
        where = f"{where}, huse"
        if not isinstance(self.class_column, str) or not self.class_column:
            raise HSLUsageError(f"{where}: class_column must name an attribute column, got {self.class_column!r}")
        for key in ("class_weight", "graph_weight", "gap_weight"):
            _check_number(where, key, getattr(self, key))
        _check_number(where, "zeta", self.zeta, positive=True)
        _check_head(where, self.embedding, self.logit_scale)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    description: str = ""
    levels: int = 2  # stacked encoder levels L (paper: 2)
    # K networks of this config, each trained on its own seed, scored as one: their levels follow each
    # other in every score and vector (hsl/members.py, hsl/model.py).
    members: int = 1
    # With members: the numbers of the one index vector. 0 keeps the members' vectors side by side
    # (members x levels x joint_dim x parts); a smaller size projects them onto the principal directions
    # of the training products' and titles' vectors, fitted once after training (hsl/projection.py).
    index_dim: int = 0
    d_model: int = 256  # transformer width
    heads: int = 4
    ff_dim: int = 1024  # transformer feed-forward width
    dropout: float = 0.1
    image_layers: int = 1  # transformer layers in each image level
    text_layers: int = 1  # transformer layers in each text level
    joint_dim: int = 256  # J: size of object, image and query vectors
    region_grid: int = 0  # pool the store's region grid to N x N cells before the model (0: as stored)
    level_weights: tuple[float, ...] = (0.5, 1.0)  # w_l, one per level; official: deepest 1.0, level 1 0.5
    granularities: tuple[str, ...] = GRANULARITIES  # which terms S_obj / S_img enter the score and loss
    agg: str = "mean"  # how S_obj pools region scores: mean | max | topk (mean of the k best)
    topk: int = 3
    normalize_query: bool = False  # L2-normalise q1/q2 (the official code does; DESIGN leaves it open)
    # Multiplier on every similarity before the in-batch softmax. The official code has none (scale 1)
    # with both sides L2-normalised, so its logits live in [-1, 1]: a 256-way softmax can then never
    # single out the positive (loss floor ~log(1 + 255 e^-2) = 3.5) and all negatives keep pulling.
    # 10 (temperature 0.1) sits in the usual contrastive range (InfoNCE/VSE 0.05-0.1, CLIP's init 1/0.07)
    # and, with unnormalised queries, only sets the starting temperature: |q| can still grow or shrink.
    logit_scale: float = 10.0
    losses: dict[str, float] = field(default_factory=lambda: {"hsl": 1.0})  # loss name -> weight
    training: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAINING))
    hsl: HSLLossConfig | None = None  # settings of the "hsl" loss; None: it trains the model's granularities
    sgml: SGMLConfig | None = None  # settings of the "sgml" loss; defaults when the loss is named without them
    huse: HUSEConfig | None = None  # settings of the "huse" loss; needed when the loss is named

    def index_parts(self) -> tuple[bool, bool]:
        """Which parts (mean object vector, image vector) each level contributes to the one index vector."""
        use_objects, use_images = "object" in self.granularities, "image" in self.granularities
        return use_objects and (self.agg == "mean" or not use_images), use_images

    @property
    def all_level_weights(self) -> tuple[float, ...]:
        """The weight of every level of every member, members in order: what scores and losses sum over."""
        return tuple(self.level_weights) * self.members

    def produces(self) -> Produces:
        """What the model of this config computes for a batch: what its losses may ask for."""
        return Produces(self.granularities)

    @property
    def exact_by_inner_product(self) -> bool:
        """Whether query vector . index vector is the exact total score (else: re-rank candidates)."""
        return self.agg == "mean" or "object" not in self.granularities

    def __post_init__(self) -> None:
        where = f"config {self.name!r}"
        for key in ("levels", "members", "d_model", "heads", "ff_dim", "image_layers", "text_layers", "joint_dim",
                    "topk"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HSLUsageError(f"{where}: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.index_dim, int) or isinstance(self.index_dim, bool) or self.index_dim < 0:
            raise HSLUsageError(f"{where}: index_dim must be 0 (the members' vectors side by side) or a positive "
                                f"integer, got {self.index_dim!r}")
        if self.index_dim and (self.members < 2 or not self.exact_by_inner_product):
            raise HSLUsageError(f"{where}: index_dim projects the joined vectors of several members scored by one "
                                f"inner product; it needs members > 1 and agg \"mean\" (or no object granularity)")
        if not isinstance(self.region_grid, int) or self.region_grid < 0:
            raise HSLUsageError(f"{where}: region_grid must be 0 (as stored) or a positive integer")
        if self.d_model % self.heads:
            raise HSLUsageError(f"{where}: d_model {self.d_model} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise HSLUsageError(f"{where}: dropout must be in [0, 1), got {self.dropout!r}")
        if len(self.level_weights) != self.levels:
            raise HSLUsageError(f"{where}: level_weights has {len(self.level_weights)} entries for "
                                f"{self.levels} levels; give one weight per level")
        unknown = [g for g in self.granularities if g not in GRANULARITIES]
        if unknown or not self.granularities or len(set(self.granularities)) != len(self.granularities):
            raise HSLUsageError(f"{where}: granularities must be distinct values of {list(GRANULARITIES)}, "
                                f"got {list(self.granularities)}")
        if self.agg not in AGGREGATIONS:
            raise HSLUsageError(f"{where}: agg must be one of {list(AGGREGATIONS)}, got {self.agg!r}")
        if not self.logit_scale > 0:
            raise HSLUsageError(f"{where}: logit_scale must be positive, got {self.logit_scale!r}")
        bad_training = sorted(set(self.training) - set(DEFAULT_TRAINING))
        if bad_training:
            raise HSLUsageError(f"{where}: unknown training setting {bad_training[0]!r}; "
                                f"known: {sorted(DEFAULT_TRAINING)}")
        _check_share(where, "training.average_decay", self.training.get("average_decay", 0.0), 1.0, False, "0 = off")
        _check_share(where, "training.val_fraction", self.training.get("val_fraction", 0.1), 0.9, True,
                     "0 = no validation, the last epoch is kept")
        if not self.losses:
            raise HSLUsageError(f"{where}: losses is empty; give at least {{\"hsl\": 1.0}}")
        for name, weight in self.losses.items():
            _check_number(where, f"losses[{name!r}]", weight)
        if "sgml" in self.losses and self.sgml is None:
            object.__setattr__(self, "sgml", SGMLConfig())  # frozen: the one place a default is filled in
        if "huse" in self.losses and self.huse is None:
            raise HSLUsageError(f"{where}: loss 'huse' needs a \"huse\" block with its class_column")
        for block in (self.hsl, self.sgml, self.huse):
            if block is not None:
                block.check(where)


def config_from_dict(data: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from a parsed JSON dict; `source` (a file or name) appears in error messages."""
    if not isinstance(data, dict):
        raise HSLUsageError(f"{source}: a model config must be a JSON object")
    data = {k: v for k, v in data.items() if k != "meta"}  # a saved model's config.json carries meta
    known = {f.name for f in fields(ModelConfig)}
    for key in data:
        if key not in known:
            raise HSLUsageError(f"{source}: unknown config key {key!r}; known keys: {sorted(known)}")
    data.setdefault("name", Path(source).stem)
    for key in ("level_weights", "granularities"):
        if key in data:
            if not isinstance(data[key], (list, tuple)):
                raise HSLUsageError(f"{source}: {key} must be a list, got {data[key]!r}")
            data[key] = tuple(data[key])
    if "level_weights" in data:
        data["level_weights"] = tuple(float(w) for w in data["level_weights"])
    if "training" in data:
        data["training"] = {**DEFAULT_TRAINING, **data["training"]}
    for key in ("dropout", "logit_scale"):
        if isinstance(data.get(key), int) and not isinstance(data[key], bool):
            data[key] = float(data[key])
    for key, block in (("hsl", HSLLossConfig), ("sgml", SGMLConfig), ("huse", HUSEConfig)):
        if data.get(key) is not None:
            data[key] = _block_from_dict(block, data[key], f"{source}: {key}")
    try:
        return ModelConfig(**data)
    except HSLUsageError as error:
        raise HSLUsageError(f"{source}: {error}") from None


def _block_from_dict(block: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise HSLUsageError(f"{where} must be a JSON object, got {data!r}")
    known = {f.name for f in fields(block)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise HSLUsageError(f"{where}: unknown key {unknown[0]!r}; known keys: {sorted(known)}")
    if isinstance(data.get("granularities"), list):
        data = {**data, "granularities": tuple(data["granularities"])}
    if "attributes" in data and not isinstance(data["attributes"], dict):
        raise HSLUsageError(f"{where}: attributes must map column names to weights, got {data['attributes']!r}")
    try:
        return block(**data)
    except TypeError as error:  # a required key (class_column) is missing
        raise HSLUsageError(f"{where}: {error}") from None


def list_configs() -> list[str]:
    """Names of the configs shipped in hsl/configs/ (the JSON file names without .json)."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A config by name (see list_configs()) or by the path of a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        if str(name_or_path).endswith(".json") or len(path.parts) > 1:
            raise HSLUsageError(f"config file {path} not found")
        path = CONFIG_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise HSLUsageError(f"unknown model config {str(name_or_path)!r}; "
                                f"choose one of {list_configs()} or give a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HSLUsageError(f"{path}: cannot read the model config ({error})") from None
    return config_from_dict(data, str(path))


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Plain JSON-ready dict (tuples become lists); config_from_dict reads it back."""
    data = asdict(config)
    data["level_weights"] = list(config.level_weights)
    data["granularities"] = list(config.granularities)
    if config.hsl is not None and config.hsl.granularities is not None:
        data["hsl"]["granularities"] = list(config.hsl.granularities)
    for key in ("hsl", "sgml", "huse"):
        if data[key] is None:
            del data[key]  # configs without the objective stay as they were before it existed
    if config.members == 1:
        del data["members"]  # likewise for single-network configs
    if not config.index_dim:
        del data["index_dim"]
    return data
