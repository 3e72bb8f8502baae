"""A model folder read without torch: its config, its id, and whether it fits a store.

`hsl query` needs only these (and the weights as numpy, hsl/query_text.py) when the index is
current, so a cold query never imports torch; hsl/factory.py builds the torch model from the same
files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig, config_from_dict
from .errors import HSLError, HSLUsageError, StoreMismatchError
from .store import FeatureStore, quantize

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# A matrix stored in 8 bits has its float32 scales (one a row) under its name plus this suffix.
INT8_SCALE = ".int8_row_scale"


def read_config(model_dir: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, meta) of a folder written by save_model, read without loading the weights."""
    if not model_dir.is_dir():
        raise HSLError(f"model folder {model_dir} not found; give the `out` folder of a training run", "model",
                       str(model_dir))
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise HSLError(f"{path} not found: a model folder holds {CONFIG_FILE} and {WEIGHTS_FILE} "
                       "as a training run writes them into its `out` folder", "model", str(model_dir))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HSLError(f"{path} is not valid JSON ({error}); restore it or train the model again") from None
    if not isinstance(data, dict):
        raise HSLError(f"{path} must hold a JSON object; restore it or train the model again")
    meta = data.get("meta")
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("image_dim", "text_dim")):
        raise HSLError(f"{path} has no meta.image_dim / meta.text_dim; it was not written by save_model")
    try:
        config = config_from_dict(data, str(path))
    except HSLUsageError as error:
        raise HSLError(f"{error}; restore the file or train the model again") from None
    return config, meta


def read_weights(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a weights file, floating ones as float32; 8-bit matrices (int8_weights) come back
    multiplied by their row scales. Raises safetensors' own errors for a file that is not one."""
    from safetensors.numpy import load_file

    stored = load_file(str(path))
    weights = {}
    for name, value in stored.items():
        if name.endswith(INT8_SCALE):
            continue
        scale = stored.get(name + INT8_SCALE)
        if scale is not None:
            weights[name] = value.astype(np.float32) * scale[:, None]
        else:
            weights[name] = value.astype(np.float32, copy=False) if np.issubdtype(value.dtype, np.floating) else value
    return weights


def int8_weights(weights: dict[str, np.ndarray], min_size: int = 4096) -> dict[str, np.ndarray]:
    """Every float matrix of at least `min_size` numbers as int8 with one float32 scale a row (its largest
    magnitude / 127): a quarter of float32's bytes, for the model that ships inside the package; the rest
    as float16. read_weights reads them back."""
    stored = {}
    for name, value in weights.items():
        if value.ndim == 2 and value.size >= min_size and np.issubdtype(value.dtype, np.floating):
            stored[name], stored[name + INT8_SCALE] = quantize(value, np.float32)  # the store's codes, a row each
        else:
            stored[name] = value.astype(np.float16) if np.issubdtype(value.dtype, np.floating) else value
    return stored


def write_int8_weights(source: Path, target: Path) -> None:
    """The weights file `source` written to `target` as int8_weights stores them (the shipped model's
    form), readable by everyone: safetensors writes its files 0600, a package's must be world-readable."""
    from safetensors.numpy import load_file, save_file

    save_file(int8_weights(load_file(str(source))), str(target))
    target.chmod(0o644)


def model_hash(model_dir: str | os.PathLike) -> str:
    """Stable id of a saved model (sha256 of config.json + model.safetensors, 16 hex), e.g. to key caches."""
    folder = Path(model_dir)
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        path = folder / name
        if not path.is_file():
            raise HSLError(f"{path} not found; cannot identify the model in {folder}")
        digest.update(name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check_backbone(store: FeatureStore, meta: dict, model_dir: str) -> None:
    """A model only reads features of the backbone (and sizes) it was trained on."""
    for key in ("backbone", "image_dim", "text_dim"):
        if key in meta and meta[key] != store.meta[key]:
            raise StoreMismatchError(
                f"model {model_dir} was trained on {key} {meta[key]!r}, store {store.path} has "
                f"{store.meta[key]!r}; extract with `backbone` {meta.get('backbone')} or train on this store",
                "model", model_dir)
