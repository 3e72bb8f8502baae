"""Members (config `members`): independent copies of the network, trained side by side, scored as one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hsl.config import config_to_dict
from hsl.errors import HSLUsageError
from hsl.factory import load_model, save_model
from hsl.member_processes import member_threads
from hsl.model import index_dim, joined_dim
from hsl.train import TrainOptions, train

from .conftest import synthetic_store, tiny_config
from .test_model import encode, make_model, tiny


def test_the_score_is_the_sum_of_the_members_scores_and_one_inner_product() -> None:
    model = make_model(tiny(members=3))
    single = make_model(tiny())  # the same seed: the first member draws exactly a single network's weights
    assert all(torch.equal(a, b) for a, b in zip(single.state_dict().values(),
                                                  [v for k, v in model.state_dict().items()
                                                   if not k.startswith("other_members.")], strict=True))
    text, image = encode(model)
    with torch.no_grad():
        total = model.similarities(text, image).total
        members = [single, *model.other_members]
        by_member = sum(m.similarities(*encode(m)).total for m in members)
        assert torch.allclose(total, by_member, atol=1e-5)
        vectors = model.query_vectors(text) @ model.index_vectors(image).T
    assert torch.allclose(total, vectors, atol=1e-5)
    assert model.index_vectors(image).shape[1] == index_dim(model.config) == 3 * index_dim(single.config)
    assert len(text.image_queries) == len(image.objects) == 3 * single.config.levels


def test_the_projection_keeps_inner_products_within_the_fitted_directions() -> None:
    from hsl.projection import fit_index_projection

    model = make_model(tiny(members=2, index_dim=8))
    basis = torch.linalg.qr(torch.randn(joined_dim(model.config), 5, dtype=torch.float64)).Q  # a 5-d subspace
    products = torch.randn(50, 5, dtype=torch.float64) @ basis.T  # [50, joined]
    titles = torch.randn(30, 5, dtype=torch.float64) @ basis.T
    fitted = fit_index_projection(model, {"products": products.numpy(), "titles": titles.numpy()})
    assert fitted["energy"] == pytest.approx(1.0)
    projection = model.index_projection.double()
    assert torch.allclose((titles @ projection) @ (products @ projection).T, titles @ products.T, atol=1e-4)
    with pytest.raises(HSLUsageError, match="index_dim"):
        tiny(index_dim=8)  # one network: nothing to project


def test_members_round_trip_and_a_single_config_file_is_unchanged(tmp_path: Path) -> None:
    model = make_model(tiny(members=2))
    save_model(model, tmp_path / "m", {"backbone": "tiny-test"})
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.config.members == 2
    with torch.no_grad():
        assert torch.equal(model.similarities(*encode(model)).total, loaded.similarities(*encode(loaded)).total)
    assert "members" not in config_to_dict(tiny())  # configs of one network are written as before


def _members_config(tmp_path: Path, members: int, **changes: object) -> str:
    return tiny_config(tmp_path, f"members{members}{len(changes)}", {"members": members, **changes}, epochs=2)


def test_members_train_on_their_own_seeds_and_join(tmp_path: Path) -> None:
    """Member k is exactly the one-network training with seed (seed * K + k), trained in a process of its
    own (the default on the CPU) or here; the folder joins them."""
    store = tmp_path / "s.h5"
    synthetic_store(store, 80)
    config = _members_config(tmp_path, 2)
    record = train(store, tmp_path / "a", TrainOptions(config=config, seed=1, precision="fp32"))
    assert [h["member"] for h in record["history"]] == [0, 0, 1, 1] and len(record["best"]["epoch"]) == 2
    joined = load_file(str(tmp_path / "a" / "model.safetensors"))
    single = str(tmp_path / "a" / "members" / "config.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(member_threads(2))  # as each of the two member processes had
    try:
        for k in (0, 1):
            train(store, tmp_path / f"b{k}", TrainOptions(config=single, seed=2 + k, precision="fp32"))
            alone = load_file(str(tmp_path / f"b{k}" / "model.safetensors"))
            prefix = "" if k == 0 else "other_members.0."
            assert all(torch.equal(joined[prefix + key], value) for key, value in alone.items())
        # one after another in this process (`member_processes` 1, as on a GPU): the same model
        train(store, tmp_path / "here", TrainOptions(config=config, seed=1, precision="fp32", member_processes=1))
        here = load_file(str(tmp_path / "here" / "model.safetensors"))
        assert all(torch.equal(here[key], value) for key, value in joined.items())
    finally:
        torch.set_num_threads(threads)
    model, meta = load_model(tmp_path / "a")
    assert model.config.members == 2 and meta["seeds"] == [2, 3]

    # a run killed during the second member: the first is kept, the second trained again, the same model
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    shutil.rmtree(tmp_path / "c" / "members" / "1")
    (tmp_path / "c" / "model.safetensors").unlink()
    kept = (tmp_path / "c" / "members" / "0" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(HSLUsageError, match="resume"):
        train(store, tmp_path / "c", TrainOptions(config=config, seed=1, precision="fp32"))
    with pytest.raises(HSLUsageError, match="another config"):
        train(store, tmp_path / "c", TrainOptions(config=_members_config(tmp_path, 2, joint_dim=8), seed=1,
                                                  precision="fp32", resume=True))
    # members started by an older hsl, whose config.json lacks a training setting added since, still resume
    written = tmp_path / "c" / "members" / "config.json"
    older = json.loads(written.read_text())
    del older["training"]["val_fraction"]
    written.write_text(json.dumps(older, indent=2))
    train(store, tmp_path / "c", TrainOptions(config=config, seed=1, precision="fp32", resume=True))
    again = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(again[key], value) for key, value in joined.items())
    assert (tmp_path / "c" / "members" / "0" / "model.safetensors").stat().st_mtime_ns == kept


def test_cli_trains_members_and_the_query_ranks_with_all_of_them(tiny_store: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from hsl.search import Searcher
    from hsl_cli.main import app

    runner = CliRunner()
    config = _members_config(tmp_path, 3)
    trained = runner.invoke(app, ["train", "--store", str(tiny_store), "--out", str(tmp_path / "m"),
                                  "--config", config, "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    assert "member 3/3 epoch 1" in trained.stderr and trained.stdout.count("best epoch 1") == 3
    shown = runner.invoke(app, ["query", "synthetic product 3", "--store", str(tiny_store), "--model",
                                str(tmp_path / "m"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout.splitlines()[0])["results"]  # hits, ranked by all three members
    vector, _ = Searcher(tiny_store, tmp_path / "m").query_vector("synthetic product 3")
    assert vector.shape == (index_dim(load_model(tmp_path / "m")[0].config),) == (3 * 2 * 2 * 16,)


def test_index_dim_projects_the_members_vectors_with_directions_fitted_on_the_store(tmp_path: Path) -> None:
    store = tmp_path / "s.h5"
    synthetic_store(store, 80)
    config = _members_config(tmp_path, 2, index_dim=24)
    train(store, tmp_path / "m", TrainOptions(config=config, seed=0, precision="fp32", epochs=1))
    model, meta = load_model(tmp_path / "m")
    fitted = meta["index_projection"]
    assert fitted["index_dim"] == 24 and 0 < fitted["energy"] <= 1 and fitted["products"] > 40  # not the test split
    projection = model.index_projection  # [joined 128, 24], orthonormal columns
    assert projection.shape == (2 * 2 * 2 * 16, 24) == (joined_dim(model.config), index_dim(model.config))
    assert torch.allclose(projection.T @ projection, torch.eye(24), atol=1e-4)
    with torch.no_grad():  # any texts and photos of the store's feature sizes
        text = model.encode_text(torch.randn(4, 5, model.text_dim), torch.ones(4, 5, dtype=torch.bool))
        image = model.encode_image(torch.randn(6, 3, model.image_dim), torch.ones(6, 3, dtype=torch.bool))
        scores = model.similarities(text, image).total
        assert torch.allclose(scores, model.query_vectors(text) @ model.index_vectors(image).T, atol=1e-5)
        assert model.index_vectors(image).shape[1] == 24


def test_members_under_torchrun_are_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(HSLUsageError, match="without torchrun"):
        train(tmp_path / "s.h5", tmp_path / "m", TrainOptions(config=_members_config(tmp_path, 2)))
    assert not (tmp_path / "m").exists()


def test_a_member_process_that_fails_stops_the_run_with_its_own_one_line_error(tmp_path: Path) -> None:
    """An error inside a member process reaches the command as the library error it was (here: a split
    with no validation product), and no member process is left behind."""
    import multiprocessing

    store = tmp_path / "s.h5"
    synthetic_store(store, 3)
    with pytest.raises(HSLUsageError, match="split gives .* validation products"):
        train(store, tmp_path / "m", TrainOptions(config=_members_config(tmp_path, 2), val_fraction=0.1))
    assert not multiprocessing.active_children()


def test_a_member_process_killed_ends_the_command_in_one_line(tiny_store: Path, tmp_path: Path) -> None:
    """The OOM killer's way: one member process SIGKILLed. The command stops the other, exits 1 and says in
    one line which member ended and how to go on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .test_kills import _living, process_tree

    config = tiny_config(tmp_path, "members2", {"members": 2}, epochs=500)
    command = [sys.executable, "-m", "hsl_cli.main", "train", "--store", str(tiny_store), "--config", config,
               "--quiet", "--out", str(tmp_path / "m")]
    run = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    started = time.monotonic()
    while not all((tmp_path / "m" / "members" / k / "checkpoint").exists() for k in "01"):
        assert time.monotonic() - started < 120 and run.poll() is None, "the members did not start training"
        time.sleep(0.1)
    members = {pid for pid in process_tree(run.pid) - {run.pid}
               if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
    assert len(members) == 2
    os.kill(min(members), signal.SIGKILL)
    _, stderr = run.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert run.returncode == 1 and len(lines) == 1, stderr
    assert "ended with exit code -9" in lines[0] and "--resume" in lines[0]
    assert not _living(members)
