"""The runtime's numpy preprocessing / packing / postprocessing == the reference's (HF, torch)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from conftest import random_image
from PIL import Image

from agvas.train.config import tiny_sam
from agvas.train.modeling.agmd import postprocess_map
from agvas.train.preprocess import sam_preprocess
from agvas.runtime.interpolate import resize_bilinear
from agvas.runtime.packing import pack_features
from agvas.runtime.postprocess import decide, upsample_maps
from agvas.runtime.preprocess import SamParams, SiglipParams, sam_input, select_best_resolution, siglip_crops

SIZES = [(64, 64), (80, 96), (96, 80), (37, 200), (200, 37), (131, 67), (8, 9), (300, 299)]


def hf_params(proc, cfg) -> SiglipParams:
    return SiglipParams(proc.size["height"], tuple(proc.image_mean), tuple(proc.image_std), proc.rescale_factor,
                        int(proc.resample), tuple(map(tuple, proc.image_grid_pinpoints)),
                        cfg.llava["vision_aspect_ratio"])


def hf_processor(size: int, pinpoints):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    return LlavaOnevisionImageProcessorPil(size={"height": size, "width": size}, image_grid_pinpoints=pinpoints,
                                           image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@pytest.mark.parametrize("hw", SIZES)
def test_siglip_crops_equal_hf_processor(tiny_parts, hw):
    _, _, proc = tiny_parts
    img = random_image(hw[0] * 7 + hw[1], hw[1], hw[0])
    p = hf_params(proc, tiny_sam())
    ref = proc(images=[img], return_tensors="np")
    got = siglip_crops(img, p)
    assert got.dtype == np.float32
    assert np.array_equal(got, ref["pixel_values"][0]), "SigLIP crops differ from the HF processor"
    assert tuple(ref["image_sizes"][0]) == hw
    assert np.array_equal(siglip_crops(img, p, base_only=True), got[:1])


def test_siglip_crops_equal_hf_at_real_dims():
    """SigLIP-so400m sizes (384 crops, 6x6 pinpoints, CLIP mean/std) on a large non-square image."""
    pins = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    proc = hf_processor(384, pins)
    img = random_image(3, 1000, 700)
    p = SiglipParams(384, (0.5,) * 3, (0.5,) * 3, proc.rescale_factor, int(proc.resample),
                     tuple(map(tuple, pins)), "anyres_max_9")
    ref = proc(images=[img], return_tensors="np")["pixel_values"][0]
    got = siglip_crops(img, p)
    assert got.shape == ref.shape and np.array_equal(got, ref)


def test_select_best_resolution_matches_hf():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pins = [[64 * i, 64 * j] for i in range(1, 4) for j in range(1, 4)]
    for hw in SIZES + [(1000, 10), (10, 1000), (129, 130)]:
        assert select_best_resolution(hw, pins) == tuple(hf_select(hw, pins))


@pytest.mark.parametrize("hw", [(64, 64), (96, 80), (37, 200), (131, 67)])
def test_sam_input_equals_reference(hw):
    cfg = tiny_sam()
    img = random_image(hw[0] + hw[1], hw[1], hw[0])
    ref, ref_size = sam_preprocess(img, cfg)
    got, size = sam_input(img, SamParams(cfg.pixel_encoder.img_size, cfg.sam_pixel_mean, cfg.sam_pixel_std))
    assert size == ref_size
    assert np.array_equal(got, ref.numpy())


@pytest.mark.parametrize("hw", [(64, 64), (80, 96), (96, 80), (37, 200), (131, 67)])
@pytest.mark.parametrize("vision_tokens", ["anyres", "base"])
def test_packing_equals_semantic_features(tiny_parts, hw, vision_tokens):
    model, _, proc = tiny_parts
    img = random_image(hw[0] * 3 + hw[1], hw[1], hw[0])
    out = proc(images=[img], return_tensors="pt")
    with torch.no_grad():
        ref = model.semantic_features(out["pixel_values"], out["image_sizes"], vision_tokens)[0].numpy()
        feats = model.project_crops(out["pixel_values"][0]).numpy()
    newline = model.llava.model.image_newline.detach().numpy()
    got = pack_features(feats, hw, newline, hf_params(proc, model.cfg), vision_tokens)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("hw", [(384, 384), (200, 380), (380, 150)])
def test_packing_anyres_max_downsampling_equals_hf(hw):
    """A 6x6 grid of 4x4-token tiles exceeds anyres_max_9, so HF's bilinear downsampling runs."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    pins = [[64 * i, 64 * j] for i in range(1, 7) for j in range(1, 7)]
    cfg = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=16),
                               image_grid_pinpoints=pins)
    p = SiglipParams(64, (0.5,) * 3, (0.5,) * 3, 1 / 255, 3, tuple(map(tuple, pins)), "anyres_max_9")
    rows, cols = (d // 64 for d in select_best_resolution(hw, pins))
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((1 + rows * cols, 16, 8)).astype(np.float32)
    newline = rng.standard_normal(8).astype(np.float32)
    fake = types.SimpleNamespace(config=cfg)
    ref, _ = LlavaOnevisionModel.pack_image_features(fake, [torch.from_numpy(feats)], torch.tensor([hw]),
                                                     torch.from_numpy(newline), "anyres_max_9")
    got = pack_features(feats, hw, newline, p)
    ref = ref[0].numpy()
    assert got.shape == ref.shape and got.shape[0] < 1 + rows * cols * 16  # downsampled
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # ATen's downsampling kernel: <= 1 ulp


@pytest.mark.parametrize("shapes", [((32, 32), (128, 128)), ((97, 128), (300, 401)), ((24, 24), (16, 16)),
                                    ((5, 5), (5, 9))])
def test_resize_bilinear_equals_torch(shapes):
    (h, w), out = shapes
    x = np.random.default_rng(1).random((3, h, w), dtype=np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], out, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize_bilinear(x, out), ref[0].numpy(), rtol=0, atol=2e-7)


@pytest.mark.parametrize("orig", [(300, 200), (120, 400), (64, 64), (9, 1000)])
def test_upsample_maps_equals_postprocess_map(orig):
    img = 128
    h, w = orig
    scale = img / max(h, w)
    inp = (int(h * scale + 0.5), int(w * scale + 0.5))
    low = np.random.default_rng(2).random((3, 64, 64), dtype=np.float32)
    ref = postprocess_map(torch.from_numpy(low), inp, orig, img).numpy()
    got = upsample_maps(low, inp, orig, img)
    assert got.shape == (3, h, w)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-7)


def test_decide_threshold_min_area():
    prob = np.zeros((10, 20), np.float32)
    prob[2:4, 3:6] = 0.7  # 6 pixels
    prob[0, 0] = 0.5  # not > 0.5
    v = decide(prob, 0.5)
    assert v.anomalous and v.area_px == 6 and v.area_pct == pytest.approx(3.0) and v.max_score == pytest.approx(0.7)
    assert not decide(prob, 0.5, min_area=6).anomalous  # reference: mask.sum() > min_area
    assert decide(prob, 0.5, min_area=5).anomalous
    assert not decide(prob, 0.7).anomalous and decide(prob, 0.7).mask.sum() == 0


def test_exif_rotated_and_modes_match_reference_preprocessing(tiny_parts, tmp_path):
    """Bad-input conversions happen once in agvas.imageio; both paths see the same RGB image."""
    from agvas.imageio import load_image

    _, _, proc = tiny_parts
    img = random_image(5, 90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (60, 90)
    ref = proc(images=[loaded], return_tensors="np")["pixel_values"][0]
    assert np.array_equal(siglip_crops(loaded, hf_params(proc, tiny_sam())), ref)
