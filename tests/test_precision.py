"""--precision: how auto resolves, what the store, model and index record, and that bf16 features stay
close to float32 ones on real photos."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from hsl.errors import HSLUsageError, StoreMismatchError
from hsl.extract import ExtractOptions, extract
from hsl.precision import cpu_has_native_bf16, resolve_precision
from hsl.search import Searcher
from hsl.store import FeatureStore
from hsl.train import TrainOptions, train
from hsl_cli.main import app

from .conftest import write_manifest

runner = CliRunner()


def test_resolve_precision() -> None:
    assert resolve_precision("auto", "cpu").name == ("bf16" if cpu_has_native_bf16() else "fp32")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        chosen = resolve_precision(name, "cpu")
        assert (chosen.name, chosen.dtype, chosen.layout) == (name, dtype, "channels_last")
    assert resolve_precision("bf16", "cuda").channels_last  # no GPU needed to resolve
    assert resolve_precision("fp32", "cuda").channels_last  # measured on an H200: never slower than NCHW
    with pytest.raises(HSLUsageError, match="fp64"):
        resolve_precision("fp64", "cpu")


def test_auto_on_cuda_is_fp32_with_channels_last() -> None:
    # measured on an H200 (docs/benchmarks.md): float32 + NHWC beat bf16/fp16 autocast for these towers
    chosen = resolve_precision("auto", "cuda")  # no GPU needed to resolve
    assert (chosen.name, chosen.layout, chosen.needs_grad_scaling) == ("fp32", "channels_last", False)
    assert resolve_precision("fp16", "cuda").needs_grad_scaling


def test_store_records_and_keeps_its_precision(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 12)
    store = tmp_path / "s.h5"
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0, precision="fp32", limit=6))
    with pytest.raises(StoreMismatchError, match="precision"):  # all rows of a store come from one computation
        extract(manifest, store, ExtractOptions(backbone="tiny", workers=0, precision="bf16"))
    report = extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))  # auto: the store's own
    assert report.extracted == 6
    with FeatureStore.open(store) as opened:
        assert opened.info()["precision"] == "fp32"
    bf16 = tmp_path / "b.h5"
    extract(manifest, bf16, ExtractOptions(backbone="tiny", workers=0, precision="bf16"))
    with FeatureStore.open(store) as a, FeatureStore.open(bf16) as b:
        assert b.meta["precision"] == "bf16"
        rows = np.arange(len(a))
        fp32_regions = torch.from_numpy(a.read_features(rows)["regions"].astype(np.float32))
        bf16_regions = torch.from_numpy(b.read_features(rows)["regions"].astype(np.float32))
    cos = F.cosine_similarity(fp32_regions.flatten(0, 1), bf16_regions.flatten(0, 1), dim=-1)
    assert cos.min() > 0.99  # the tiny tower is three convolutions: far closer than the real one


def test_model_and_index_record_their_precision(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 100)
    store = tmp_path / "s.h5"
    extract(manifest, store, ExtractOptions(backbone="tiny", workers=0))
    out = tmp_path / "m"
    train(store, out, TrainOptions(config="hsl-tiny", epochs=1, precision="bf16"))
    assert json.loads((out / "config.json").read_text())["meta"]["precision"] == "bf16"
    assert json.loads((out / "train_args.json").read_text())["precision"] == "bf16"
    with pytest.raises(HSLUsageError, match="`precision` bf16"):
        train(store, out, TrainOptions(config="hsl-tiny", epochs=2, precision="fp32", resume=True))
    fp32 = Searcher(store, out, precision="fp32")
    with h5py.File(fp32.index.path, "r") as f:
        assert f.attrs["precision"] == "fp32"
    fp32_vectors = torch.from_numpy(fp32.index.matrix.copy())
    bf16 = Searcher(store, out, precision="bf16")  # another precision: the cache is rebuilt, not trusted
    with h5py.File(bf16.index.path, "r") as f:
        assert f.attrs["precision"] == "bf16"
    bf16_vectors = torch.from_numpy(bf16.index.matrix)
    assert bf16_vectors.dtype == torch.float32  # vectors stay float32 whatever the forward ran in
    assert not torch.equal(fp32_vectors, bf16_vectors)
    assert F.cosine_similarity(fp32_vectors, bf16_vectors, dim=-1).min() > 0.99


def test_cli_precision_option(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, 8)
    result = runner.invoke(app, ["extract", str(manifest), "--store", str(tmp_path / "s.h5"), "--backbone", "tiny",
                                 "--workers", "0", "--precision", "fp64", "--quiet"])
    assert result.exit_code == 2 and "fp64" in result.stderr
    result = runner.invoke(app, ["extract", str(manifest), "--store", str(tmp_path / "s.h5"), "--backbone", "tiny",
                                 "--workers", "0", "--precision", "fp32", "--quiet"])
    assert result.exit_code == 0, result.stderr
    shown = runner.invoke(app, ["info", str(tmp_path / "s.h5"), "--json"])
    assert json.loads(shown.stdout)["precision"] == "fp32"


def test_bf16_features_of_real_photos_agree_with_float32(fashion: Path) -> None:
    """The stated tolerance (docs/benchmarks.md): per vector, cosine >= 0.98 for the image features (whole and
    each of the 49 regions) and >= 0.999 for the title's token states and sentence vector."""
    from hsl.backbones import create_backbone
    from hsl.images import load_image

    with open(fashion / "products.csv", encoding="utf-8") as handle:
        rows = [r for _, r in zip(range(8), csv.DictReader(handle), strict=False)]
    backbone = create_backbone("minilm-effnet")
    pixels = torch.from_numpy(np.stack([load_image(str(fashion / "images" / f"{r['id']}.jpg"), 224) for r in rows]))
    texts = [r["productDisplayName"] for r in rows]
    features = {}
    for name in ("fp32", "bf16"):
        backbone.use_precision(resolve_precision(name, "cpu"))
        whole, regions = backbone.encode_images(pixels)
        text = backbone.encode_texts(texts)
        valid = torch.arange(text.tokens.shape[1])[None] < text.lengths[:, None]  # [B,T]
        features[name] = (whole, regions.flatten(0, 1), text.tokens[valid], text.sentence)
    for part, a, b, least in zip(("whole", "regions", "tokens", "sentence"), features["fp32"], features["bf16"],
                                 (0.98, 0.98, 0.999, 0.999), strict=True):
        assert a.dtype == b.dtype == torch.float32
        cos = F.cosine_similarity(a, b, dim=-1)
        assert cos.min() >= least, f"{part}: cosine {cos.min():.4f} < {least}"
