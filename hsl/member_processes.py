"""The members of a config trained at once, each in a process of its own (CPU).

Why: on the CPU a training step is mostly matrix products, which two threads share well, and many
small operations (dropout masks, layer norms, index copies, the optimizer), which they share badly.
Three one-thread processes side by side keep both cores busy with whole steps: on the 2-core
machine the shipped model's training (hsl-members3 on the catalog) took 13 min 37 s, against 15 min
18 s with the members one after another, two threads each (docs/results.md, issue 18).

Each process trains its member exactly as one `Trainer` would in this process, with
max(1, cores // processes) threads, writes the member's `done.json` and reports steps and epochs
through a queue. A member's weights depend on its thread count (float sums in another order), so a
member resumed after a kill continues as it began only on a machine with as many cores; `hsl train`
is deterministic for a fixed seed, precision and machine. Processes end with the command (even on
`kill -9`: hsl/processes.py); a failure in one stops the others, and `resume` keeps every epoch
they finished.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import errors
from .atomic import write_text_atomic
from .options import TrainOptions

Member = tuple[int, Path, TrainOptions]  # (k, its folder, its options: the one-network config and seed)


def member_threads(processes: int) -> int:
    """Intra-op threads of each of `processes` member processes: the cores shared out, at least one."""
    return max(1, (os.cpu_count() or 1) // processes)


def train_in_processes(trainer: Callable[..., Any], store_path: str | os.PathLike, members: list[Member],
                       processes: int, on_step: Callable[[int, int, float], None] | None,
                       on_epoch: Callable[[int, dict], None]) -> dict[int, dict]:
    """Train `members` in up to `processes` processes at once, each by `trainer(store_path, folder,
    options)` (hsl/train.py's Trainer class, which the processes import by name); {k: its record}.
    `on_step` gets the steps of all of them (done, in all), `on_epoch(k, entry)` each member's epochs."""
    context = multiprocessing.get_context("spawn")  # not fork: torch's thread pool does not survive one
    messages = context.Queue()
    threads = member_threads(processes)
    waiting, running, records = list(members), {}, {}
    steps: dict[int, tuple[int, int]] = {}

    def handle(kind: str, k: int, payload: object) -> None:
        if kind == "step":
            steps[k] = payload[:2]
            if on_step:
                on_step(sum(s for s, _ in steps.values()), sum(t for _, t in steps.values()), payload[2])
        elif kind == "epoch":
            on_epoch(k, payload)
        elif kind == "done":
            records[k] = payload
            running.pop(k).join()
        else:
            raise _rebuilt(k, kind, payload)

    checked = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < processes:
                k, folder, options = waiting.pop(0)
                running[k] = context.Process(target=_train_member, name=f"hsl-member-{k}", daemon=True,
                                             args=(trainer, str(store_path), str(folder), options, k, threads,
                                                   messages, os.getpid()))
                running[k].start()
            try:
                handle(*messages.get(timeout=1.0))
            except queue.Empty:
                pass
            if time.monotonic() - checked >= 1.0:  # the others' steps keep the queue busy: look every second
                checked = time.monotonic()
                _check_alive(running)
    finally:
        for process in running.values():
            process.kill()
            process.join()
    return records


def _check_alive(running: dict[int, multiprocessing.process.BaseProcess]) -> None:
    """Raise for a member process killed (or ended by a crash): one that ends on its own sends its record
    or its error first and exits 0, and the loop reads that message in turn."""
    for k, process in running.items():
        if not process.is_alive() and process.exitcode != 0:
            raise errors.HSLError(f"the training process of member {k} ended with exit code {process.exitcode} "
                                  "(killed, or out of memory?); run the same command with `resume` to continue "
                                  "from its last finished epoch")


def _rebuilt(k: int, kind: str, payload: tuple) -> BaseException:
    """The exception a member process reported, as the parent raises it."""
    if kind == "interrupted":
        return KeyboardInterrupt()
    if kind == "oserror":
        return OSError(*payload)
    if kind == "hsl":
        name, message, parameter, value, allowed = payload
        kind_of = getattr(errors, name, None)
        if not (isinstance(kind_of, type) and issubclass(kind_of, errors.HSLError)) or name == "StoreInUseError":
            kind_of = errors.HSLError  # StoreInUseError words its own message from other arguments
        return kind_of(message, parameter, value, allowed)
    return RuntimeError(f"the training of member {k} failed:\n{payload[0]}")


def _train_member(trainer: Callable[..., Any], store_path: str, folder: str, options: TrainOptions, k: int,
                  threads: int, messages: multiprocessing.Queue, parent: int) -> None:
    """A member process: train one member, report through `messages`, write its done.json."""
    from .processes import die_with_parent

    die_with_parent(parent)
    try:
        import torch

        torch.set_num_threads(threads)
        member = trainer(store_path, folder, options)
        epochs, finished = member.epochs - member.start_epoch, [0]

        def step(step: int, total: int, loss: float) -> None:  # counted over this run's epochs, not per epoch
            messages.put(("step", k, (finished[0] * total + step, epochs * total, loss)))

        def epoch(entry: dict) -> None:
            finished[0] += 1
            messages.put(("epoch", k, entry))

        record = member.run(step, epoch)
        write_text_atomic(Path(folder) / "done.json", json.dumps(record, indent=2))
        messages.put(("done", k, record))
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the group; the parent says what to do
        messages.put(("interrupted", k, ()))
    except errors.HSLError as exc:
        messages.put(("hsl", k, (type(exc).__name__, str(exc), exc.parameter, exc.value, exc.allowed)))
    except OSError as exc:  # rebuilt as the same errno, words and file, which the CLI words in one line
        messages.put(("oserror", k, (exc.errno, exc.strerror, exc.filename) if exc.errno else (str(exc),)))
    except Exception:  # noqa: BLE001 - a bug: its traceback goes to the parent, which raises it
        messages.put(("error", k, (traceback.format_exc(),)))
    messages.close()
    messages.join_thread()  # everything put is delivered before the process ends
