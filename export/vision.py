"""The vision-side engines — ``vision``, ``sam_encoder``, ``spam``, ``agmd`` — and ``lm_head``.

Each is one wrapper from :mod:`agvas.export.wrappers` exported by :func:`agvas.export.graphs.export_module`
with its dynamic axes (named as the manifest records them):

- ``vision``: ``n_crops`` (the runtime runs base tile + grid crops together, or only the base);
- ``sam_encoder``, ``agmd``: ``batch``;
- ``spam``: ``batch`` and ``n_tokens`` (N depends on the image size under anyres);
- ``lm_head``: ``batch`` and ``positions`` (the fast path's chosen positions).
"""

from __future__ import annotations

from pathlib import Path

import torch

from agvas.train.modeling.agvas import AGVAS

from .graphs import EXTERNAL_DATA_THRESHOLD, export_module, module_bytes
from .wrappers import ENGINE_IO, AgmdEngine, LmHeadEngine, SamEncoderEngine, SpamEngine, VisionEngine

DYNAMIC_AXES: dict[str, dict[str, dict[int, str]]] = {
    "vision": {"pixel_values": {0: "n_crops"}},
    "sam_encoder": {"sam_input": {0: "batch"}},
    "spam": {"semantic_tokens": {0: "batch", 1: "n_tokens"}, "pixel_embedding": {0: "batch"}},
    "agmd": {"anchor_states": {0: "batch"}, "pixel_embedding": {0: "batch"}},
    "lm_head": {"hidden_states": {0: "batch", 1: "positions"}},
}
GRAPH_ENGINES = tuple(DYNAMIC_AXES)


def _examples(model: AGVAS, name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The wrapper and example inputs (size 2-3 on every dynamic axis) for engine ``name``."""
    cfg = model.cfg
    dtype = next(model.parameters()).dtype
    h, c, g = cfg.hidden_size, cfg.pixel_dim, cfg.pixel_encoder.grid
    s, sam = cfg.vision_image_size, cfg.pixel_encoder.img_size
    gen = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if name == "vision":
        return VisionEngine(model), (rnd(2, 3, s, s),)
    if name == "sam_encoder":
        return SamEncoderEngine(model), (rnd(2, 3, sam, sam),)
    if name == "spam":
        return SpamEngine(model), (rnd(2, 3, h), rnd(2, c, g, g))
    if name == "agmd":
        return AgmdEngine(model), (rnd(2, 3, h), rnd(2, c, g, g))
    if name == "lm_head":
        return LmHeadEngine(model), (rnd(2, 3, h),)
    raise ValueError(f"unknown engine {name!r}; expected one of {GRAPH_ENGINES}")


def weight_bytes(model: AGVAS, name: str) -> int:
    """Bytes of the weights engine ``name`` carries (decides ONNX external data)."""
    parts = {"vision": [model.llava.model.vision_tower, model.llava.model.multi_modal_projector],
             "sam_encoder": [model.pixel_encoder], "spam": [model.spam], "agmd": [model.refiner, model.agmd],
             "lm_head": [model.lm_head]}[name]
    return sum(module_bytes(p) for p in parts)


def export_graph(model: AGVAS, name: str, out_dir: str | Path, *, opset: int,
                 external_threshold: int = EXTERNAL_DATA_THRESHOLD) -> tuple[Path, bool]:
    """Export engine ``name`` of ``model`` to ``out_dir/{name}.onnx`` (fp32); returns the path and
    whether its weights went to external data (more than ``external_threshold`` bytes)."""
    module, example = _examples(model, name)
    inputs, outputs = ENGINE_IO[name]
    external = weight_bytes(model, name) > external_threshold
    path = export_module(module, example, Path(out_dir) / f"{name}.onnx", input_names=inputs,
                         output_names=outputs, dynamic=DYNAMIC_AXES[name], opset=opset, external=external)
    return path, external
