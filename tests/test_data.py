"""Data: synthetic generator, instruction fields, meta.json / MVTec / folder readers, sources."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from agvas.train.data import synthetic as syn
from agvas.train.data.folder import list_images
from agvas.train.data.instruct import colour_word, conversation, describe, mask_geometry
from agvas.train.data.meta import Record, load_mask, meta_from_mvtec, read_meta, write_meta
from agvas.train.templates import ANCHOR_PHRASE, DIRECT_ANSWERS, MODES

# ---- synthetic generator --------------------------------------------------------------------


@pytest.mark.parametrize("defect", sorted(syn.DEFECTS))
def test_defects_have_exact_masks_and_are_deterministic(defect):
    for cat in ("tiles", "washer", "gravel"):
        a = syn.make_sample(cat, defect, seed=3, index=5, size=96)
        b = syn.make_sample(cat, defect, seed=3, index=5, size=96)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.mask, b.mask)
        normal = syn.make_sample(cat, None, seed=3, index=5, size=96)
        np.testing.assert_array_equal(a.normal, normal.image)  # same base image as the normal sample
        changed = (a.image != a.normal).any(-1)
        np.testing.assert_array_equal(changed, a.mask)  # exact: mask == changed pixels
        assert a.mask.sum() >= syn.MIN_DEFECT_PIXELS
        assert np.abs(a.image[a.mask].astype(float) - a.normal[a.mask]).mean() / 255 >= syn.MIN_CHANGE
    other = syn.make_sample("tiles", defect, seed=4, index=5, size=96)
    assert not np.array_equal(other.image, syn.make_sample("tiles", defect, seed=3, index=5, size=96).image)


def test_object_defects_stay_on_the_object():
    for defect in syn.DEFECTS:
        s = syn.make_sample("hex_nut", defect, seed=0, index=2, size=96)
        _, fg = syn.CATEGORIES["hex_nut"](96, syn._rng(0, "hex_nut", 2))
        assert not (s.mask & ~fg).any(), defect


def test_split_is_zero_shot_and_dataset_is_balanced(tmp_path):
    assert not set(syn.TRAIN_CATEGORIES) & set(syn.TEST_CATEGORIES)
    assert not set(syn.TRAIN_DEFECTS) & set(syn.TEST_DEFECTS)
    spec = syn.SyntheticSpec(seed=1, size=64, n_per_category=6, n_test_per_category=4, n_train_good=1,
                             train_categories=("stripes", "pill"), test_categories=("fabric",))
    meta_path = syn.write_dataset(tmp_path / "d", spec)
    meta = json.loads(meta_path.read_text())
    assert sorted(meta["train"]) == ["pill", "stripes"] and sorted(meta["test"]) == ["fabric"]
    for split, kinds in (("train", spec.train_defects), ("test", spec.test_defects)):
        for cat, recs in meta[split].items():
            assert sum(r["anomaly"] for r in recs) * 2 == len(recs)  # balanced
            assert {r["specie_name"] for r in recs if r["anomaly"]} <= set(kinds)
    assert (tmp_path / "d/stripes/train/good").is_dir()
    # every tool reads it like a real dataset: the MVTec scan finds the same test images
    scanned = meta_from_mvtec(tmp_path / "d")
    assert {r["img_path"] for r in scanned["test"]["fabric"]} == {r["img_path"] for r in meta["test"]["fabric"]}
    recs = read_meta(meta_path, "test")
    for r in recs:
        m = load_mask(r, (64, 64))
        assert m.any() == r.anomaly
    # same spec again: kept as is
    mtime = meta_path.stat().st_mtime_ns
    syn.write_dataset(tmp_path / "d", spec)
    assert meta_path.stat().st_mtime_ns == mtime


def test_unknown_category_or_defect():
    with pytest.raises(ValueError, match="unknown synthetic category 'nope'"):
        syn.make_sample("nope", None, 0, 0)
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        syn.make_sample("tiles", "dent", 0, 0)
    with pytest.raises(ValueError, match="overlap"):
        syn.SyntheticSpec(train_categories=("tiles",), test_categories=("tiles",)).validate()


# ---- instruction fields ---------------------------------------------------------------------


def _mask(h, w, boxes):
    m = np.zeros((h, w), bool)
    for y0, y1, x0, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def test_geometry_location_size_count_elongation():
    g = mask_geometry(_mask(90, 90, [(2, 8, 70, 80)]))  # top right, 60 px of 8100
    assert g.location == "the top right" and g.regions == 1
    assert g.area_fraction == pytest.approx(60 / 8100) and g.size == "small"
    assert g.shape == "compact"
    g = mask_geometry(_mask(90, 90, [(40, 50, 40, 50), (44, 46, 60, 62)]))
    assert g.location == "the center" and g.regions == 2
    g = mask_geometry(_mask(90, 90, [(80, 82, 0, 60)]))  # a thin line at the bottom left
    assert g.location == "the bottom left" and g.shape == "thin linear" and g.elongation > 4
    g = mask_geometry(_mask(100, 100, [(0, 100, 0, 30)]))  # 30 % of the image on the left
    assert g.location == "the left side" and g.size == "very large"
    assert mask_geometry(np.zeros((10, 10), bool)) is None


def test_fields_from_known_mask_and_normal_image():
    img = np.full((90, 90, 3), 200, np.uint8)
    m = _mask(90, 90, [(2, 8, 70, 80)])
    img[m] = (10, 10, 10)
    f = describe(img, m, "metal_nut", "scratch")
    assert "the top right" in f.observation and "one small" in f.observation and "1 percent" in f.observation
    assert f.summary.endswith(ANCHOR_PHRASE + ".") and "small dark scratch" in f.summary
    assert "metal nut" in f.expectation and "scratch" in f.diagnosis and "the top right" in f.explanation
    two = describe(img, _mask(90, 90, [(2, 8, 70, 80), (60, 70, 10, 20)]), "tile", "crack")
    assert "There are two" in two.observation and "cracks" in two.observation
    n = describe(img, np.zeros((90, 90), bool), "tile", "good")
    assert ANCHOR_PHRASE in n.summary and "normal" in n.summary
    assert colour_word(np.full((4, 4, 3), (220, 20, 20), np.uint8), np.ones((4, 4), bool)) == "red"


def test_conversations_every_mode_carry_the_anchors():
    img = np.zeros((40, 40, 3), np.uint8)
    m = _mask(40, 40, [(5, 10, 5, 10)])
    f = describe(img, m, "tile", "hole")
    for mode in MODES:
        for seed in range(5):
            instr, answer = conversation(f, mode, random.Random(seed))
            assert ANCHOR_PHRASE in answer and instr and ANCHOR_PHRASE not in instr
            if mode == "describe_plus":
                assert instr.startswith(f.expectation)
            if mode == "explain":
                assert answer.endswith(f.explanation)
    instr, answer = conversation(None, "direct", random.Random(0))
    assert answer in DIRECT_ANSWERS
    with pytest.raises(ValueError, match="needs the instruction fields"):
        conversation(None, "explain", random.Random(0))


# ---- meta.json readers ----------------------------------------------------------------------


def _write_dataset(root, prefix=""):
    (root / prefix / "cat/test/good").mkdir(parents=True)
    (root / prefix / "cat/test/hole").mkdir(parents=True)
    (root / prefix / "cat/ground_truth/hole").mkdir(parents=True)
    Image.new("RGB", (20, 10)).save(root / prefix / "cat/test/good/000.png")
    Image.new("RGB", (20, 10)).save(root / prefix / "cat/test/hole/000.png")
    gt = np.zeros((10, 20), np.uint8)
    gt[2:5, 3:9] = 200
    gt[6, 6] = 100  # anti-aliased edge below the half level
    Image.fromarray(gt).save(root / prefix / "cat/ground_truth/hole/000_mask.png")


def test_anomalyclip_form(tmp_path):
    _write_dataset(tmp_path)
    scanned = read_meta(tmp_path, "test")  # a folder without meta.json: its MVTec layout
    meta = write_meta(tmp_path)
    recs = read_meta(meta, "test")
    assert recs == scanned == read_meta(tmp_path, "test")
    assert [(r.specie, r.anomaly) for r in recs] == [("good", False), ("hole", True)]
    m = load_mask(recs[1], (10, 20))
    assert m.sum() == 18 and m[2:5, 3:9].all()
    assert not load_mask(recs[0], (10, 20)).any()
    with pytest.raises(ValueError, match=r"000_mask.png: mask is 20x10 but its image .* is 30x10"):
        load_mask(recs[1], (10, 30))


def test_bayes_pfl_form(tmp_path):
    _write_dataset(tmp_path, "KSDD2")
    good = {"img_path": "KSDD2/cat/test/good/000.png", "mask_path": "", "cls_name": "cat", "specie_name": "good",
            "dataset_name": "x", "anomaly": 0}
    bad = {"img_path": "KSDD2/cat/test/hole/000.png", "mask_path": "KSDD2/cat/ground_truth/hole/000_mask.png",
           "cls_name": "cat", "specie_name": "hole", "dataset_name": "y", "anomaly": 1}
    placeholder = dict(good, img_path="")
    data = {"train": {"cat": [placeholder]}, "test": {"cat": [good, bad]}}
    (tmp_path / "meta_KSDD2.json").write_text(json.dumps(data))
    recs = read_meta(tmp_path / "meta_KSDD2.json", "all")
    assert len(recs) == 2 and recs[1].mask.name == "000_mask.png"
    # the meta file may also sit inside the dataset folder
    (tmp_path / "KSDD2/meta_KSDD2.json").write_text(json.dumps(data))
    assert len(read_meta(tmp_path / "KSDD2/meta_KSDD2.json", "test")) == 2


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected an object with 'train' and/or 'test' splits"),
    ('{"test": []}', "split 'test' must map category -> list of records"),
    ('{"test": {"cat": [{"img_path": "a.png"}]}}', r"test/cat\[0\]: record lacks \['mask_path'"),
    ('{"test": {"cat": [{"img_path": "nope.png", "mask_path": "", "cls_name": "cat", "specie_name": "good", '
     '"anomaly": 0}]}}', "image nope.png not found"),
    ('{"test": {"cat": [{"img_path": "cat/test/hole/000.png", "mask_path": "", "cls_name": "cat", '
     '"specie_name": "hole", "anomaly": 1}]}}', "has no mask_path"),
    ('{"test": {"cat": [{"img_path": "cat/test/hole/000.png", "mask_path": "", "cls_name": "cat", '
     '"specie_name": "hole", "anomaly": "yes"}]}}', "'anomaly' must be 0 or 1"),
    ('{"train": {}}', "no records in split 'test'"),
])
def test_malformed_meta_errors_name_the_file(tmp_path, content, message):
    _write_dataset(tmp_path)
    p = tmp_path / "meta.json"
    p.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        read_meta(p, "test")
    assert str(p) in str(e.value)


def test_missing_meta_and_mvtec_mask(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta file not found"):
        read_meta(tmp_path / "meta.json")
    _write_dataset(tmp_path)
    (tmp_path / "cat/ground_truth/hole/000_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"hole/000.png: no mask in .*ground_truth/hole"):
        meta_from_mvtec(tmp_path)
    rec = Record(tmp_path / "cat/test/hole/000.png", tmp_path / "cat/ground_truth/hole/000_mask.png", "cat", "hole", True)
    with pytest.raises(ValueError, match="cannot read mask"):
        load_mask(rec, (10, 20))


def test_folder_and_glob(tmp_path):
    for n in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.png"]
    assert [p.name for p in list_images(str(tmp_path / "*.png"))] == ["b.png"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    with pytest.raises(ValueError, match="glob matches no files"):
        list_images(str(tmp_path / "*.bmp"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="folder has no images"):
        list_images(tmp_path / "empty")


# ---- sources and the mixture ----------------------------------------------------------------


def test_general_and_vqa_sources(tmp_path):
    from agvas.train.data.sources import SEG_NONE, SEG_ONLY, GeneralSegSource, VQASource

    Image.new("RGB", (16, 12), (9, 9, 9)).save(tmp_path / "img.png")
    m = np.zeros((12, 16), np.uint8)
    m[:4] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    (tmp_path / "seg.json").write_text(json.dumps([{"image": "img.png", "mask": "m.png", "phrase": "the sky"}]))
    ex = GeneralSegSource(tmp_path / "seg.json", augment=False).example(0, random.Random(0))
    assert "the sky" in ex.instruction and ANCHOR_PHRASE in ex.answer and ex.supervise == SEG_ONLY
    assert ex.mask.sum() == 4 * 16
    conv = [{"image": "img.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                                   {"from": "gpt", "value": "A dark square."}]}]
    (tmp_path / "vqa.json").write_text(json.dumps(conv))
    ex = VQASource(tmp_path / "vqa.json").example(0, random.Random(0))
    assert ex.instruction == "What is this?" and ex.answer == "A dark square." and ex.supervise == SEG_NONE
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "img.png"}]))
    with pytest.raises(ValueError, match=r"bad.json\[0\]: expected \{'image', 'mask', 'phrase'\}"):
        GeneralSegSource(tmp_path / "bad.json")
    with pytest.raises(ValueError, match=r"bad.json\[0\]: expected \{'image', 'conversations'"):
        VQASource(tmp_path / "bad.json")


def test_mixture_is_a_function_of_seed_and_index(tmp_path):
    from agvas.train.data.mixture import Mixture
    from agvas.train.data.sources import AnomalySource

    spec = syn.SyntheticSpec(size=64, n_per_category=4, n_test_per_category=2, n_train_good=0,
                             train_categories=("stripes",), test_categories=("fabric",))
    meta = syn.write_dataset(tmp_path, spec)
    recs = read_meta(meta, "train")
    mix = Mixture({"seg": (AnomalySource(recs, {"direct": 1.0}), 0.5),
                   "instruct": (AnomalySource(recs, {"explain": 1.0}), 0.5)}, seed=7)
    a = [mix.example(k) for k in range(12)]
    b = [mix.example(k) for k in reversed(range(12))][::-1]
    assert [(n, e.instruction, e.answer) for n, e in a] == [(n, e.instruction, e.answer) for n, e in b]
    assert {n for n, _ in a} == {"seg", "instruct"}
    with pytest.raises(ValueError, match="no source with a positive probability"):
        Mixture({"seg": (AnomalySource(recs, {"direct": 1.0}), 0.0)})


def test_augment_moves_image_and_mask_together():
    from agvas.train.data.sources import augment

    arr = np.zeros((9, 7, 3), np.uint8)
    arr[1, 5] = 255
    mask = np.zeros((9, 7), bool)
    mask[1, 5] = True
    for seed in range(12):
        im, m = augment(Image.fromarray(arr), mask, random.Random(seed))
        a = np.asarray(im).astype(int).sum(-1)
        assert m.sum() == 1 and a.shape == m.shape
        assert np.unravel_index(a.argmax(), a.shape) == tuple(np.argwhere(m)[0])
