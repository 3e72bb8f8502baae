"""Every long command killed as users run it (default options: `hsl extract` with its decoding workers),
beside the special configurations: no process of the killed run outlives it, and the same command run
again at once resumes and completes. Each case is recorded for docs/reliability.md (see conftest.py)."""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from hsl.checkpoint import Checkpoint
from hsl.extract import ExtractOptions, default_workers, extract
from hsl.factory import create_model, save_model
from hsl.search import Searcher
from hsl.store import DONE, FeatureStore

from .conftest import assert_same_store, big_photos, synthetic_store, tiny_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")

KILLS = "kills"
HSL = [sys.executable, "-m", "hsl_cli.main"]
SURVIVAL_LIMIT = 3.0  # seconds a process of a killed run may take to be gone


def _parents() -> dict[int, int]:
    found = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                found[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    return found


def process_tree(root: int) -> set[int]:
    """`root` and every process below it."""
    parents, tree, grew = _parents(), {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def _living(pids: set[int]) -> set[int]:
    living = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):  # a zombie has ended; only its exit status is left to collect
            living.add(pid)
    return living


def kill_run(proc: subprocess.Popen, whole_group: bool, target: int | None = None) -> tuple[float, int]:
    """SIGKILL `target` (default: the command's main process) or the run's whole process group; wait until
    no process of the run is left. Returns (seconds the last one lasted after the kill, processes in the run)."""
    tree = process_tree(proc.pid)
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)  # Ctrl-C / `kill -- -PGID`, at its hardest
    else:
        os.kill(target or proc.pid, signal.SIGKILL)  # the OOM killer, `kill -9 PID`
    killed = time.monotonic()
    while _living(tree - {proc.pid}) and time.monotonic() - killed < 60:
        time.sleep(0.02)
    survivors = _living(tree - {proc.pid})
    lasted = time.monotonic() - killed
    proc.wait(timeout=60)
    assert not survivors and lasted <= SURVIVAL_LIMIT, f"{sorted(survivors)} outlived the kill by {lasted:.1f} s"
    return lasted, len(tree)


def start(command: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)  # its own group: a group kill spares pytest


def kill_loop(command: Callable[[], list[str]], after: Callable[[bool], None], full_run: float, kills: int,
              seed: int, whole_group: bool = False) -> dict:
    """Start `command` (each start is the previous kill's rerun), SIGKILL it at a random moment, `after(finished)`;
    `kills` times. Every start must either be killed by us or end with exit 0: a rerun is never refused.
    Moments are drawn from the first 70% of an uninterrupted run: a resumed run is shorter than a whole one,
    and one that finishes before its kill tries nothing."""
    rng = random.Random(seed)
    seen = {"kills": 0, "finished": 0, "lasted": 0.0, "most_processes": 0}
    while seen["kills"] < kills:
        proc = start(command())
        time.sleep(rng.uniform(0.2, 0.7 * full_run))
        if proc.poll() is None:
            lasted, processes = kill_run(proc, whole_group)
            seen["kills"] += 1
            seen["lasted"] = max(seen["lasted"], lasted)
            seen["most_processes"] = max(seen["most_processes"], processes)
        else:
            seen["finished"] += 1
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
        after(proc.returncode == 0)
    return seen


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started


def _kill_words(seen: dict) -> str:
    return (f"no process outlived a kill by more than {seen['lasted']:.2f} s (runs of up to "
            f"{seen['most_processes']} processes); every rerun started at once")


EXTRACT_CASES = {  # name: (extra options, kills, whole group)
    "default options (decoding workers), main process killed": ([], 10, False),
    "default options (decoding workers), whole process group killed": ([], 5, True),
    "--workers 0, main process killed": (["--workers", "0"], 5, False),
}


@pytest.mark.parametrize("case", list(EXTRACT_CASES))
def test_extract_killed(case: str, tmp_path: Path, reliability) -> None:
    extra, kills, whole_group = EXTRACT_CASES[case]
    photos = big_photos(tmp_path / "photos", 240)
    base = [*HSL, "extract", str(photos), "--backbone", "tiny", "--batch-size", "4", "--quiet", *extra, "--store"]
    reference, store = tmp_path / "reference.h5", tmp_path / "killed.h5"
    full_run = timed(base + [str(reference)])
    states = {"mid-run": 0}

    def check(finished: bool) -> None:
        if not store.exists():
            return
        with FeatureStore.open(store) as opened:  # every kill leaves a store that opens
            done = int((opened.column("status") == DONE).sum())
        states["mid-run"] += 0 < done < 240
        if done == 240:  # finished: compare, then start over for more kills
            assert_same_store(store, reference)
            store.unlink()

    seen = kill_loop(lambda: base + [str(store)], check, full_run, kills, seed=11, whole_group=whole_group)
    subprocess.run(base + [str(store)], check=True, capture_output=True)
    assert_same_store(store, reference)
    assert not store.with_name(store.name + ".lock").exists()  # a finished run leaves nothing beside the store
    assert states["mid-run"] >= 2, states
    if not extra:
        assert default_workers() >= 1 and seen["most_processes"] >= 2  # the decoding worker was there to kill
    reliability(KILLS, f"SIGKILL during `hsl extract`, {case}", seen["kills"],
                f"{_kill_words(seen)}; the store opened after every kill ({states['mid-run']} mid-extraction); "
                "the rerun equals an uninterrupted run")


def test_second_extract_on_a_store_being_written_is_refused_at_once(tmp_path: Path, reliability) -> None:
    photos = big_photos(tmp_path / "photos", 300)
    store = tmp_path / "s.h5"
    command = [*HSL, "extract", str(photos), "--backbone", "tiny", "--batch-size", "4", "--quiet",
               "--store", str(store)]
    first = start(command)
    deadline = time.monotonic() + 60
    while not store.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    # Paused while the second runs (its lock stays held), so a loaded machine cannot let the first finish
    # before the second starts: the refusal is checked every time, not only when the first is still busy.
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        with FeatureStore.open(store) as opened:
            before = int((opened.column("status") == DONE).sum())
        second = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 1 and len(lines) == 1, second.stderr
    assert f"is in use: process {first.pid} (hsl extract) is writing it" in lines[0]
    assert "re-create" not in lines[0] and "delete" not in lines[0]
    assert first.wait(timeout=120) == 0  # the first run went on undisturbed and finished
    with FeatureStore.open(store) as opened:
        assert before <= 300 and int((opened.column("status") == DONE).sum()) == 300
    reliability(KILLS, "a second `hsl extract` on a store that one is writing", 1,
                "exit 1 at once, one line naming the writer's process id; the first run finished "
                f"({lines[0].replace(str(store), 's.h5')!r})")


def test_train_killed_then_resumed(tiny_store: Path, tmp_path: Path, reliability) -> None:
    def command(out: Path, resume: bool) -> list[str]:
        return [*HSL, "train", "--store", str(tiny_store), "--config", "hsl-tiny", "--epochs", "16", "--seed", "2",
                "--quiet", "--out", str(out)] + (["--resume"] if resume else [])

    reference, killed = tmp_path / "whole", tmp_path / "killed"
    full_run = timed(command(reference, False))
    want = load_file(str(reference / "model.safetensors"))
    completed = {"runs": 0}

    def check(finished: bool) -> None:
        if Checkpoint(killed / "checkpoint").exists():
            Checkpoint(killed / "checkpoint").load()  # the checkpoint reads after every kill
        if finished:
            got = load_file(str(killed / "model.safetensors"))
            assert all(torch.equal(got[k], want[k]) for k in want)
            completed["runs"] += 1
            shutil.rmtree(killed)

    seen = kill_loop(lambda: command(killed, killed.exists()), check, full_run, 12, seed=12)
    subprocess.run(command(killed, killed.exists()), check=True, capture_output=True)
    got = load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    reliability(KILLS, "SIGKILL during `hsl train`, then `--resume` (random moments, seeded)", seen["kills"],
                f"{_kill_words(seen)}; the checkpoint read after every kill; {completed['runs'] + 1} resumed "
                "trainings ended with weights bit-identical to an uninterrupted run")


@pytest.mark.parametrize("whole_group", [False, True], ids=["main process killed", "whole process group killed"])
def test_members_train_killed_then_resumed(whole_group: bool, tiny_store: Path, tmp_path: Path, reliability) -> None:
    """A config of members trains them at once, a process each (the default on the CPU): a kill leaves no
    member process behind, and `--resume` ends with the model of an uninterrupted run, bit for bit."""
    config = tiny_config(tmp_path, "members2", {"members": 2}, epochs=8)

    def command(out: Path, resume: bool) -> list[str]:
        return [*HSL, "train", "--store", str(tiny_store), "--config", config, "--seed", "1", "--quiet",
                "--out", str(out)] + (["--resume"] if resume else [])

    reference, killed = tmp_path / "whole", tmp_path / "killed"
    full_run = timed(command(reference, False))
    want = load_file(str(reference / "model.safetensors"))

    def check(finished: bool) -> None:
        if finished:
            got = load_file(str(killed / "model.safetensors"))
            assert all(torch.equal(got[k], want[k]) for k in want)
            shutil.rmtree(killed)

    seen = kill_loop(lambda: command(killed, killed.exists()), check, full_run, 4, seed=5, whole_group=whole_group)
    subprocess.run(command(killed, killed.exists()), check=True, capture_output=True)
    got = load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert seen["most_processes"] >= 3  # the command and its two member processes were killed
    who = "the whole process group" if whole_group else "the main process"
    reliability(KILLS, f"SIGKILL of {who} during `hsl train` of a 2-member config (a process a member), then "
                "`--resume`", seen["kills"], f"{_kill_words(seen)}; every resumed training ended with weights "
                "bit-identical to an uninterrupted run")


def test_index_killed(tmp_path: Path, reliability) -> None:
    store = tmp_path / "big.h5"
    synthetic_store(store, 3000)
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(create_model("hsl-default", 32, 24), model_dir, {"backbone": "tiny"})
    command = [*HSL, "index", "--store", str(store), "--model", str(model_dir), "--quiet"]
    full_run = timed(command)
    want = [h.id for h in Searcher(store, model_dir).search("synthetic product 7", top_k=10).hits]
    cache = store.with_name(store.name + ".index")

    def check(finished: bool) -> None:
        got = [h.id for h in Searcher(store, model_dir).search("synthetic product 7", top_k=10).hits]
        assert got == want  # a query after the kill finds a whole index or rebuilds it
        if finished:
            shutil.rmtree(cache)

    shutil.rmtree(cache)
    seen = kill_loop(lambda: command, check, full_run, 12, seed=13)
    reliability(KILLS, "SIGKILL during `hsl index` (random moments, seeded)", seen["kills"],
                f"{_kill_words(seen)}; the next query found a complete index or rebuilt it, equal to an "
                "uninterrupted one")


def test_merge_killed(tmp_path: Path, reliability) -> None:
    halves = [tmp_path / "a.h5", tmp_path / "b.h5"]
    synthetic_store(halves[0], 4000, seed=1)
    synthetic_store(halves[1], 4000, seed=2, prefix="t")
    reference, merged = tmp_path / "reference.h5", tmp_path / "merged.h5"
    command = [*HSL, "merge", *map(str, halves), "--store"]
    full_run = timed(command + [str(reference)])

    def check(finished: bool) -> None:
        if merged.exists():  # the old store or the whole merge, never half of one
            assert_same_store(merged, reference)
            merged.unlink()

    seen = kill_loop(lambda: command + [str(merged)], check, full_run, 12, seed=14)
    subprocess.run(command + [str(merged)], check=True, capture_output=True)
    assert_same_store(merged, reference)
    reliability(KILLS, "SIGKILL during `hsl merge` (random moments, seeded)", seen["kills"],
                f"{_kill_words(seen)}; no store or the whole merged store after every kill; the rerun equals "
                "an uninterrupted merge")


def _serve_until_listening(command: list[str]) -> tuple[subprocess.Popen, str]:
    proc = start(command)
    for line in proc.stderr:  # the address comes on stderr once the port is bound
        if match := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
            url = match.group(1)
            for _ in range(200):
                try:
                    httpx.get(f"{url}/health", timeout=5).raise_for_status()
                    return proc, url
                except httpx.ConnectError:
                    time.sleep(0.05)
    proc.kill()
    raise AssertionError("hsl serve did not start")


def test_serve_killed_and_restarted_on_its_port(tiny_store: Path, tmp_path: Path, reliability) -> None:
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    save_model(create_model("hsl-tiny", 32, 24), model_dir, {"backbone": "tiny"})
    command = [*HSL, "serve", "--store", str(tiny_store), "--model", str(model_dir), "--port"]
    proc, url = _serve_until_listening(command + ["0"])
    port = url.rsplit(":", 1)[1]
    restarts, lasted = 3, 0.0
    for _ in range(restarts):
        with httpx.Client() as client:  # a client mid-conversation when the server dies
            assert client.get(f"{url}/search", params={"q": "red shirt"}).status_code == 200
            lasted = max(lasted, kill_run(proc, whole_group=False)[0])
        proc, again = _serve_until_listening(command + [port])  # the same port, right away
        assert again == url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    reliability(KILLS, "SIGKILL of `hsl serve`, restarted on the same port at once", restarts,
                f"no process outlived a kill by more than {lasted:.2f} s; the restart bound the port and answered")


def _rank_process(launcher: int, rank: int) -> int | None:
    for pid in process_tree(launcher) - {launcher}:
        try:
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"hsl_cli.main" in cmdline and _parents().get(pid) == launcher:
                    return pid
        except OSError:
            continue
    return None


def test_torchrun_extract_one_rank_killed(tmp_path: Path, reliability) -> None:
    photos = big_photos(tmp_path / "photos", 96, size=900)
    reference, store = tmp_path / "one.h5", tmp_path / "two.h5"
    extract(photos, reference, ExtractOptions(backbone="tiny", workers=0, batch_size=2))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "hsl_cli.main", "extract", str(photos), "--store", str(store), "--backbone", "tiny",
                "--batch-size", "2", "--quiet"]  # default decoding workers
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = start(torchrun, env=env)
    shard = store.with_name(store.name + ".shards") / "rank-00001-of-00002.h5"
    deadline = time.monotonic() + 120
    while not _mid_share(shard) and time.monotonic() < deadline:
        time.sleep(0.02)
    rank = _rank_process(job.pid, 1)
    assert rank is not None and len(process_tree(rank)) >= 2, "rank 1 and its decoding worker"
    tree = process_tree(job.pid)
    os.kill(rank, signal.SIGKILL)
    killed = time.monotonic()
    assert job.wait(timeout=120) != 0  # torchrun stops the other rank and gives up
    while _living(tree) and time.monotonic() - killed < 60:
        time.sleep(0.02)
    lasted = time.monotonic() - killed
    assert not _living(tree), sorted(_living(tree))
    rerun = subprocess.run(torchrun, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_same_store(store, reference)
    reliability(KILLS, "SIGKILL of one rank's main process during `hsl extract` under torchrun (2 ranks, "
                "default decoding workers)", 1,
                f"torchrun stopped the other rank; the whole run ({len(tree)} processes) was gone {lasted:.1f} s "
                "after the kill; the same command resumed at once and equals a one-process run")


def _mid_share(shard: Path) -> bool:
    try:
        with FeatureStore.open(shard) as opened:
            status = opened.column("status")
            return 0 < int((status == DONE).sum()) < len(status)
    except Exception:  # not built yet, or caught mid-rename: ask again
        return False

