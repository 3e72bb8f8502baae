"""Training checkpoints that a kill at any moment cannot leave half-written.

Each finished epoch goes to its own folder `checkpoint/epoch-NNNN/` (tensors as safetensors,
the rest as JSON). Only when that folder is complete does the small file `checkpoint/latest`
switch to it (write + atomic rename); older folders are removed after that. A resumed run thus
always reads one epoch's model, optimizer and state together.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_atomic
from .errors import HSLError


class Checkpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def exists(self) -> bool:
        return (self.folder / "latest").is_file()

    def epoch(self) -> int:
        """The last finished epoch on disk (0: none)."""
        return int((self.folder / "latest").read_text().split("-")[1]) if self.exists() else 0

    def save(self, epoch: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
        """tensors: {"model": state_dict, "optimizer": flat tensors, ...}; state: JSON-able."""
        name = f"epoch-{epoch:04d}"
        final, tmp = self.folder / name, self.folder / f"{name}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for part, values in tensors.items():
                values = {k: v.detach().cpu().contiguous() for k, v in values.items()}
                save_file(values, str(tmp / f"{part}.safetensors"))
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)  # left by a kill between this rename and `latest`
            os.replace(tmp, final)
            write_atomic(self.folder / "latest", lambda pointer: pointer.write_text(name))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HSLError(f"{self.folder}: could not write the epoch {epoch} checkpoint ({exc}); free disk space "
                           "and run again with `resume` (the previous checkpoint is intact)", "resume") from None
        for old in self.folder.glob("epoch-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        try:
            folder = self.folder / (self.folder / "latest").read_text().strip()
            state = json.loads((folder / "state.json").read_text())
            tensors = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors")}
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise HSLError(f"{self.folder}: the checkpoint cannot be read ({exc}); train again without `resume` "
                           "into a new `out`", "resume") from None
        return tensors, state
