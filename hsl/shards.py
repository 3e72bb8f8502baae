"""`hsl extract` under torchrun: every process extracts a share of the work into its own shard store,
then rank 0 merges the shards into the target store.

Layout: `OUT.h5` -> `OUT.h5.shards/rank-00001-of-00002.h5`, one ordinary resumable store per rank
(data/STORE.md). Rank 0 reads the source once and compares it with `OUT.h5` (when it exists), so the
work is only what a single process would extract: new, changed, pending and failed products. It
splits that list in source order into contiguous shares (`distributed.share`) and sends each rank
its own. Because `OUT.h5` changes only at the merge, re-running the same command after a kill
yields the same shares and every shard resumes where it stopped. The ranks then agree (one
collective) whether all of them finished; only then does rank 0 merge, in rank order, which is the
source order a single process would write, and delete the shards.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import torch

from hsl_data.sources import Rejected, SourceItem

from .devices import resolve_device
from .distributed import Rank, finish, gather_objects, init, scatter_objects, share
from .errors import HSLError, StoreMismatchError
from .extract_base import ExtractOptions, ExtractReport, ProgressFn, check_backbone, plan_rows
from .merge import merge, meta_difference
from .photo_extract import PhotoSource
from .store import DONE, FeatureStore
from .store_lock import writing

# Ranks reach the final collective hours apart when shares differ in cost; a dead rank is torchrun's
# to notice (it stops the others), so this timeout only has to outlast the slowest honest share.
TIMEOUT = timedelta(days=7)


def shard_dir(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".shards")


def shard_path(store_path: Path, rank: int, world: int) -> Path:
    """`OUT.h5.shards/rank-00001-of-00002.h5`: the world size is in the name, so a rerun with another
    process count never resumes a shard that was cut differently."""
    return shard_dir(store_path) / f"rank-{rank:05d}-of-{world:05d}.h5"


@dataclass
class _Job:
    """What rank 0 sends each rank: its share, and what it needs to make a shard that merges."""

    items: list[SourceItem]
    attribute_columns: list[str]
    template: dict | None  # the target store's meta, when it exists: the shards must match it
    source_items: int = 0
    already_done: int = 0  # finished in the target store: in nobody's share
    skipped: list[Rejected] = field(default_factory=list)  # the source's rejects, on rank 0's job only


def extract_sharded(source: PhotoSource, store_path: Path, options: ExtractOptions, me: Rank,
                    progress: ProgressFn | None = None) -> ExtractReport:
    """This rank's part of a torchrun extraction; every rank returns the whole job's report."""
    started = time.perf_counter()
    device = resolve_device(options.device)
    if device.type == "cuda" and device.index is None:  # one GPU per process on a multi-GPU node
        device = torch.device("cuda", me.local_rank % torch.cuda.device_count())
    options = replace(options, device=str(device))
    init(timeout=TIMEOUT)  # gloo: the collectives carry a few Python objects, never tensors
    with ExitStack() as held:
        return _extract_job(source, store_path, options, me, progress, held, started)


def _extract_job(source: PhotoSource, store_path: Path, options: ExtractOptions, me: Rank,
                 progress: ProgressFn | None, held: ExitStack, started: float) -> ExtractReport:
    planning_error: Exception | None = None
    jobs: list = []
    if me.is_main:
        try:  # rank 0 holds the target store's writer lock from the plan to the merge
            held.enter_context(writing(store_path, "hsl extract (torchrun)"))
            jobs = _plan_jobs(source, store_path, options, me.world)
        except Exception as exc:  # the others must still hear from rank 0, or they would wait forever
            planning_error, jobs = exc, [_in_words(exc)] * me.world
    job = scatter_objects(jobs, me)
    if isinstance(job, str):  # rank 0's error, in every rank's words: torchrun may stop rank 0 before it prints
        finish()
        raise planning_error or HSLError(f"rank 0 could not plan the work: {job}")
    mine, failure = _run_share(source, job, store_path, options, me, progress)
    outcomes = gather_objects(mine, me)  # the barrier where the ranks agree whether to merge
    finish()
    if failure is not None:
        raise failure
    failed = [f"rank {r} failed: {outcome}" for r, outcome in enumerate(outcomes) if isinstance(outcome, str)]
    if failed:
        raise HSLError(f"{'; '.join(failed)}; nothing was merged, the shards in {shard_dir(store_path)} are kept: "
                       "run the same command again to resume")
    if me.is_main:
        if not store_path.exists() or any(each.items for each in jobs):  # else the store is up to date
            merge([shard_path(store_path, r, me.world) for r in range(me.world)], store_path,
                  only=[{item.id for item in each.items} for each in jobs])
        _remove_shards(store_path)
    return ExtractReport(store=str(store_path), source_items=job.source_items,
                         already_done=job.already_done + sum(o.already_done for o in outcomes),
                         extracted=sum(o.extracted for o in outcomes),
                         skipped=[s for o in outcomes for s in o.skipped], seconds=time.perf_counter() - started,
                         processes=me.world)


def _plan_jobs(source: PhotoSource, store_path: Path, options: ExtractOptions, world: int) -> list[_Job]:
    """Rank 0: the products still to extract, as `world` contiguous shares in source order."""
    base = FeatureStore.open(store_path) if store_path.exists() else None
    try:
        if base is not None:
            check_backbone(base, options)  # before any work, as in one process
        listing = source.listing(options)
        items = listing.items
        rows, _, missing = plan_rows(items, base)
        template = dict(base.meta) if base is not None else _shard_meta(store_path, world, options)
    finally:
        if base is not None:
            base.close()
    finished = {row.id for row in rows if row.status == DONE} | {m.id for m in missing}
    work = [item for item in items if item.id not in finished]
    parts = [share(len(work), Rank(r, world)) for r in range(world)]
    jobs = [_Job(work[part.start:part.stop], listing.attribute_columns, template, len(items),
                 len(items) - len(missing) - len(work)) for part in parts]
    jobs[0].skipped = list(listing.rejected) + missing
    return jobs


def _shard_meta(store_path: Path, world: int, options: ExtractOptions) -> dict | None:
    """A first run that was cut short left shards: the new ones must match them, not today's defaults."""
    for rank in range(world):
        path = shard_path(store_path, rank, world)
        if path.exists():
            with FeatureStore.open(path) as shard:
                check_backbone(shard, options)
                return dict(shard.meta)
    return None


def _run_share(source: PhotoSource, job: _Job, store_path: Path, options: ExtractOptions, me: Rank,
               progress: ProgressFn | None) -> tuple[ExtractReport | str, Exception | None]:
    """Extract this rank's share into its shard: (report, None), or (the error in words, the error)."""
    try:
        path = shard_path(store_path, me.rank, me.world)
        path.parent.mkdir(parents=True, exist_ok=True)
        shard = FeatureStore.open(path) if path.exists() else None
        if shard is not None:
            check_backbone(shard, options)
            differ = meta_difference(shard.meta, job.template) if job.template is not None else None
            if differ is not None:
                shard.close()
                key, mine, theirs = differ
                raise StoreMismatchError(f"{path} has {key} {mine!r} where this job has {theirs!r}: a shard left "
                                         "by a killed run with other options; finish that run with its own "
                                         f"options, or move {path.parent} aside to start this one")
        with writing(path, "hsl extract (torchrun)"):
            report = source.extract_items(job.items, path, shard, options, job.attribute_columns, progress,
                                          job.template)
    except Exception as exc:  # reported to every rank first: a lone raise would leave the others waiting
        return _in_words(exc), exc
    report.skipped[:0] = job.skipped
    return report, None


def _in_words(exc: Exception) -> str:
    return str(exc) if isinstance(exc, HSLError) else f"{type(exc).__name__}: {exc}"


def _remove_shards(store_path: Path) -> None:
    """After a merge the shards are redundant (and as large as the store); other files stay."""
    folder = shard_dir(store_path)
    for path in folder.glob("rank-*-of-*.h5*"):  # also shards of runs with another process count
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (something else lives there) or already gone
