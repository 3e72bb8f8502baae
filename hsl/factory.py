"""Create, save and load HSL models. A model folder is `config.json` (the architecture plus a
`meta` entry: backbone, feature dims, ...) and `model.safetensors` (weights; no pickle anywhere)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .atomic import write_atomic, write_text_atomic
from .config import ModelConfig, config_to_dict, list_configs, load_config
from .errors import HSLError
from .losses import check_config
from .model import HSLModel
from .model_files import CONFIG_FILE, WEIGHTS_FILE, model_hash, read_config, read_weights

__all__ = ["create_model", "list_models", "load_model", "model_config", "model_hash", "save_model"]


def list_models() -> list[str]:
    """Architecture names that create_model accepts (the JSON files in hsl/configs/)."""
    return list_configs()


def model_config(name_or_path: str | Path) -> ModelConfig:
    """A config by name or JSON path, held to its contract: its losses read only what its model produces."""
    return check_config(load_config(name_or_path))


def create_model(name_or_path: str | Path | ModelConfig, image_dim: int, text_dim: int) -> HSLModel:
    """A randomly initialised model (seed with torch.manual_seed first for repeatable weights)."""
    config = check_config(name_or_path) if isinstance(name_or_path, ModelConfig) else model_config(name_or_path)
    return HSLModel(config, image_dim, text_dim)


def save_model(model: HSLModel, out_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write out_dir/config.json (config + meta, with the feature dims) and out_dir/model.safetensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "image_dim": model.image_dim, "text_dim": model.text_dim}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    payload = json.dumps({**config_to_dict(model.config), "meta": meta}, indent=2)
    write_text_atomic(out / CONFIG_FILE, payload + "\n")
    return out


def load_model(model_dir: str | os.PathLike) -> tuple[HSLModel, dict[str, Any]]:
    """(model in eval mode on CPU, meta) from a folder written by save_model."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise HSLError(f"model folder {folder} not found; give the `out` folder of a training run", "model",
                       os.fspath(folder))
    config, meta = read_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        raise HSLError(f"{path} not found; the model folder is incomplete: train the model again")
    try:
        tensors = {name: torch.from_numpy(value) for name, value in read_weights(path).items()}
    except Exception as error:  # safetensors raises its own error types for truncated or foreign files
        raise HSLError(f"{path} is not a readable safetensors file ({error}); train the model again") from None
    model = HSLModel(config, meta["image_dim"], meta["text_dim"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        problems = [f"{label} {names[:3]}{' ...' if len(names) > 3 else ''}"
                    for label, names in (("missing", missing), ("unexpected", unexpected),
                                         ("wrong shape", wrong_shape)) if names]
        raise HSLError(f"{path} does not fit {folder / CONFIG_FILE} ({'; '.join(problems)}); keep the two files "
                       "of one training run together, or train the model again")
    model.load_state_dict(tensors)
    return model.eval(), meta
