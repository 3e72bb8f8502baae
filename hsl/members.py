"""Members: a model of K networks, each trained on its own and scored as one (config `members`).

The heads train from scratch on frozen features, and networks of different seeds end a few points
apart on the same test split; the sum of their scores is better than any of them (docs/results.md,
issue 18). Each member is a whole training of the one-network config, in OUT/members/K with its own
seed (seed * members + k): other initial weights, batch order, dropout and validation products, the
same fixed test split. On the CPU the members train at once, each in a process of its own
(hsl/member_processes.py: 11% faster on 2 cores than one after another); on a GPU, or with
`member_processes` 1, one after another in this process. (A first version trained them side by side
on the same batches, in one loop: as good after 20 epochs on one seed. Trained apart, each member picks
its own best epoch on its own validation products, and each is exactly the plain training of its seed
with the same threads, which the tests check.) OUT then holds the members joined as one
model folder (hsl/model.py: the first member's weights under their own names, the others under
`other_members.k.`), which `hsl eval`, `hsl index` and `hsl query` use like any other.

A killed run resumes with `--resume`: finished members are kept (their `done.json`), the one in
progress continues from its last epoch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from . import distributed
from .atomic import write_text_atomic
from .config import ModelConfig, config_from_dict, config_to_dict
from .dataset import Split
from .devices import resolve_device
from .errors import HSLUsageError
from .factory import save_model
from .member_processes import train_in_processes
from .model import HSLModel
from .model_files import WEIGHTS_FILE, read_config, read_weights
from .options import TrainOptions
from .projection import fit_index_projection, joined_vectors_of_store

MEMBERS = "members"


def train_members(store_path: str | os.PathLike, out_dir: str | os.PathLike, options: TrainOptions, config: ModelConfig,
                  trainer: Callable[..., Any], on_epoch: Callable[[dict], None] | None = None,
                  on_step: Callable[[int, int, float], None] | None = None) -> dict:
    """Train the K members, each by `trainer(store_path, folder, options).run(on_step, on_epoch)`
    (hsl/train.py's Trainer: one network, passed in so that this module does not import it), at once in
    processes of their own on the CPU (hsl/member_processes.py) or one after another here, and join them
    into `out_dir`; the record: every member's, and their epochs in one history (each names its member)."""
    if distributed.from_env().distributed:
        raise HSLUsageError("a config of several members starts its own processes, one a member; run "
                            "`hsl train` without torchrun, or train one-network configs with it", "config",
                            options.config)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not options.resume:
        raise HSLUsageError(f"{out} is not empty; give another `out`, or `resume` to continue its training",
                            "out", str(out))
    member_config = replace(config, members=1, index_dim=0)
    single = json.dumps(config_to_dict(member_config), indent=2)
    config_path = out / MEMBERS / "config.json"
    # Compared as configs, not as text: one written by an older hsl lacks settings added since (their defaults).
    if config_path.is_file() and config_from_dict(json.loads(config_path.read_text(encoding="utf-8")),
                                                  str(config_path)) != member_config:
        raise HSLUsageError(f"{out} holds members of another config; resume with the config it was started "
                            f"with ({options.config} differs)", "config", options.config)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_path, single)
    records, pending = {}, []
    for k in range(config.members):
        folder = out / MEMBERS / str(k)
        done = folder / "done.json"
        if done.is_file():
            records[k] = json.loads(done.read_text(encoding="utf-8"))
        else:
            seed = options.seed * config.members + k
            pending.append((k, folder, replace(options, config=str(config_path), seed=seed)))

    def report(k: int, entry: dict) -> None:
        if on_epoch:
            on_epoch({**entry, "member": k, "members": config.members})

    # From the config, not from what is left: a resumed member gets the threads it started with.
    processes = member_processes(options, config.members)
    if processes > 1 and pending:  # each holds its own training set in memory: the budget is shared out
        pending = [(k, folder, replace(member, memory_budget=member.memory_budget // processes))
                   for k, folder, member in pending]
        records.update(train_in_processes(trainer, store_path, pending, processes, on_step, report))
    else:
        for k, folder, member in pending:
            records[k] = trainer(store_path, folder, member).run(on_step, lambda entry, k=k: report(k, entry))
            write_text_atomic(folder / "done.json", json.dumps(records[k], indent=2))
    records = [records[k] for k in range(config.members)]
    folders = [out / MEMBERS / str(k) for k in range(config.members)]
    join_members(folders, out, config, {"seeds": [options.seed * config.members + k for k in range(len(folders))]},
                 store_path)
    record = {"members": records, "split": records[0]["split"], "streamed": records[0]["streamed"],
              "history": [{**entry, "member": k} for k, r in enumerate(records) for entry in r["history"]],
              "best": {"epoch": [r["best"]["epoch"] for r in records], "val": {}}}
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
    return record


def member_processes(options: TrainOptions, members: int) -> int:
    """How many of a config's `members` train at once: `options.member_processes`, by default all of
    them on the CPU (each in its own process) and one at a time, in this process, on a GPU."""
    on_cpu = resolve_device(options.device).type == "cpu"
    wanted = options.member_processes or (members if on_cpu else 1)
    return max(1, min(wanted, members))


def join_members(folders: list[Path], out: str | os.PathLike, config: ModelConfig, meta: dict,
                 store_path: str | os.PathLike) -> HSLModel:
    """One model folder of `members` len(folders) from the model folders of one-network trainings, read as
    load_model reads a folder; a config with `index_dim` fits its projection on the products of
    `store_path` (the store the members trained on) outside the test split (hsl/projection.py)."""
    _, first_meta = read_config(Path(folders[0]))
    joined = HSLModel(replace(config, members=len(folders)), first_meta["image_dim"], first_meta["text_dim"])
    state = {}
    for k, folder in enumerate(folders):  # the first member's names as they are, the others' prefixed
        prefix = f"other_members.{k - 1}." if k else ""
        weights = read_weights(Path(folder) / WEIGHTS_FILE)
        state.update({prefix + key: torch.from_numpy(value) for key, value in weights.items()})
    if config.index_dim:
        state["index_projection"] = joined.index_projection  # fitted below, from the joined members
    joined.load_state_dict(state)
    if config.index_dim:
        vectors = joined_vectors_of_store(joined, store_path, Split(**first_meta["split"]))
        meta = {**meta, "index_projection": fit_index_projection(joined, vectors)}
    save_model(joined, out, {**first_meta, **meta, "epoch": None})
    return joined
