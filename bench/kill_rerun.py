"""Time from a SIGKILL to a rerun that starts and completes, for each long command, as users run it.

Real catalog, real default backbone (MiniLM + EfficientNet-Lite0), default options (`hsl extract`
with its decoding workers). For each case: start the command, wait until it is mid-work, SIGKILL
it (the main process, the whole process group, or one torchrun rank's main process), then run the
same command again at once, and again after each refusal, until one run is accepted and completes.
Reported: seconds from the kill to the start of the accepted rerun (0.0: the first rerun went
through), refused reruns, and how long the killed run's last other process (workers, ranks) lived
after the kill (0.0 when there was none to outlive it).

    python bench/kill_rerun.py [--catalog ../shared/data/fashion] [--products 300] [--pythonpath DIR]

`--pythonpath DIR` runs the commands from another checkout's packages (DIR holding `hsl`, `hsl_cli`,
`hsl_data`), so the same script measures before and after a change.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_kills import _living, _rank_process, process_tree  # noqa: E402  (the suite's /proc helpers)

CAP = 150.0  # seconds of refused reruns before a case is reported as blocked


def _done(store: Path) -> int:
    try:
        with h5py.File(store, "r", locking=False) as f:
            return int((f["status"][:] == 1).sum())
    except (OSError, KeyError):
        return 0


def _wait(condition, limit: float = 600) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the command never got going")
        time.sleep(0.05)


def _after(seconds: float):
    """Ready `seconds` after this call: past the imports, into the work (the short commands)."""
    start = time.monotonic()
    return lambda: time.monotonic() - start >= seconds


def _kill(proc: subprocess.Popen, how: str) -> tuple[float, set[int]]:
    tree = process_tree(proc.pid)
    if how == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    elif how.startswith("rank"):
        os.kill(_rank_process(proc.pid, int(how[4:])), signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    return time.monotonic(), tree


class _Watch(threading.Thread):
    """Polls the killed run's processes from the kill on: when was the last one gone?"""

    def __init__(self, tree: set[int], killed_at: float) -> None:
        super().__init__(daemon=True)
        self.tree, self.killed_at, self.lasted, self.stop = tree, killed_at, None, False
        self.start()

    def run(self) -> None:
        while not self.stop:
            if not _living(self.tree):
                self.lasted = round(time.monotonic() - self.killed_at, 2)
                return
            time.sleep(0.02)

    def seconds(self) -> float | str:
        self.stop = True
        return self.lasted if self.lasted is not None else f"alive after {time.monotonic() - self.killed_at:.0f}"


def _rerun(command: list[str], killed_at: float, tree: set[int], env: dict) -> dict:
    watch = _Watch(tree, killed_at)  # a killed process we have not reaped yet is a zombie: it counts as gone
    refused, last_error = 0, ""
    while True:
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode == 0:
            break
        refused += 1
        last_error = done.stderr.strip().splitlines()[-1][:200] if done.stderr.strip() else ""
        if started - killed_at > CAP:
            return {"rerun_after_s": None, "refused": refused, "error": last_error, "last_process_s": watch.seconds()}
    return {"rerun_after_s": round(started - killed_at, 2), "refused": refused, "error": last_error,
            "last_process_s": watch.seconds()}


def _start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)


def _case(name: str, command: list[str], ready, how: str, env: dict, rerun: list[str] | None = None) -> dict:
    proc = _start(command, env)
    _wait(lambda: ready() or proc.poll() is not None)
    if proc.poll() is not None:
        raise SystemExit(f"{name}: the command ended (exit {proc.returncode}) before the kill; give more --products")
    killed_at, tree = _kill(proc, how)
    result = _rerun(rerun or command, killed_at, tree, env)
    if proc.poll() is None and how.startswith("rank"):
        proc.wait(timeout=300)
    for pid in _living(tree):  # measured: now clear the way for the next case
        os.kill(pid, signal.SIGKILL)
    print(json.dumps({"case": name, **result}), flush=True)
    return {"case": name, **result}


def _serve_case(hsl: list[str], store: Path, env: dict) -> dict:
    port = "8765"
    command = [*hsl, "serve", "--store", str(store), "--port", port]

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    proc = _start(command, env)
    _wait(answers)
    killed_at, tree = _kill(proc, "main")
    watch = _Watch(tree, killed_at)
    again = _start(command, env)
    _wait(answers, CAP)
    result = {"case": "hsl serve: main process killed, restarted on its port",
              "rerun_after_s": 0.0, "answered_after_s": round(time.monotonic() - killed_at, 2), "refused": 0,
              "last_process_s": watch.seconds()}
    again.send_signal(signal.SIGINT)
    again.wait(timeout=30)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/fashion")
    parser.add_argument("--products", type=int, default=300)
    parser.add_argument("--pythonpath", help="run the hsl found here instead of the installed one")
    parser.add_argument("--out", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args()
    hsl, env = [sys.executable, "-m", "hsl_cli.main"], {**os.environ, "HF_HUB_OFFLINE": "1"}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    work = Path(tempfile.mkdtemp(prefix="hsl-kill-"))
    manifest = [str(args.catalog / "products.csv"), "--text-column", "productDisplayName",
                "--image-template", "images/{id}.jpg", "--limit", str(args.products)]
    rows = []
    store = work / "k.h5"
    extract = [*hsl, "extract", *manifest, "--quiet", "--store", str(store)]
    for how in ("main", "group"):
        store.unlink(missing_ok=True)
        rows.append(_case(f"hsl extract: {how} killed", extract, lambda: _done(store) >= 64, how, env))
    two = work / "two.h5"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "hsl_cli.main", "extract", *manifest, "--quiet", "--store", str(two)]
    shard = work / "two.h5.shards" / "rank-00001-of-00002.h5"
    rows.append(_case("hsl extract under torchrun: rank 1 killed", torchrun, lambda: _done(shard) >= 32, "rank1",
                      {**env, "OMP_NUM_THREADS": "1"}))
    out = work / "model"
    train = [*hsl, "train", "--store", str(store), "--out", str(out), "--epochs", "3", "--quiet"]
    rows.append(_case("hsl train: main killed, rerun with --resume", train,
                      lambda: (out / "checkpoint" / "latest").exists(), "main", env, rerun=[*train, "--resume"]))
    index = [*hsl, "index", "--store", str(store), "--quiet"]
    rows.append(_case("hsl index: main killed", index, _after(3.0), "main", env))
    half = work / "half.csv"
    with open(args.catalog / "products.csv", encoding="utf-8") as src, open(half, "w", encoding="utf-8") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=[*reader.fieldnames, "image"])
        writer.writeheader()
        for i, row in zip(range(args.products // 2), reader, strict=False):
            writer.writerow({**row, "id": f"b{i}", "image": str(args.catalog / "images" / f"{row['id']}.jpg")})
    other = work / "other.h5"
    subprocess.run([*hsl, "extract", str(half), "--text-column", "productDisplayName", "--allow-outside",
                    "--quiet", "--store", str(other)], check=True, env=env)
    merged = work / "merged.h5"
    merge = [*hsl, "merge", str(store), str(other), "--store", str(merged)]
    building = merged.with_name(merged.name + ".tmp")
    rows.append(_case("hsl merge: main killed", merge, building.exists, "main", env))
    rows.append(_serve_case(hsl, store, env))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
