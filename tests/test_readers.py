"""Native readers of the paper's training mix (Table 5) on tiny fixtures in the upstream on-disk
formats: REFER pickles + COCO instances, ADE20K / COCO-Stuff label maps, COCO-format part
JSONs, LLaVA conversations; LISA-style sub-dataset sampling; multi-turn labels; the CLI."""

from __future__ import annotations

import argparse
import json
import pickle
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from agvas.train.data.sources import SEG_NONE, SEG_ONLY, SubDatasets
from agvas.train.templates import ANCHOR_PHRASE

S = 32  # fixture images are S x S


def _image(path: Path, seed: int, bright: tuple[int, int] | None = None) -> np.ndarray:
    """Save a random RGB image (PNG bytes whatever the suffix: lossless) and return its array."""
    arr = np.random.RandomState(seed).randint(0, 120, (S, S, 3)).astype(np.uint8)
    if bright:
        arr[bright] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG")
    return arr


def _box(x0, y0, x1, y1) -> np.ndarray:
    m = np.zeros((S, S), bool)
    m[y0:y1, x0:x1] = True
    return m


def _rle(mask: np.ndarray) -> dict:
    """Compressed RLE (``counts`` a str, as COCO JSON stores it)."""
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": r["size"], "counts": r["counts"].decode()}


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Uncompressed RLE (``counts`` a list of run lengths, column-major, starting with zeros)."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _poly(x0, y0, x1, y1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


# ---- referring segmentation -------------------------------------------------------------------


def _write_refer(root: Path, name: str, split_by: str) -> dict:
    """ROOT/NAME/refs(split_by).p + instances.json, images where REFER keeps them."""
    d = root / name
    d.mkdir(parents=True)
    if name == "refclef":
        img_dir, files = root / "images" / "saiapr_tc-12", ["25/images/25.jpg", "26/images/26.jpg"]
    else:
        img_dir, files = root / "images" / "mscoco" / "images" / "train2014", [
            "COCO_train2014_000000000001.jpg", "COCO_train2014_000000000002.jpg"]
    _image(img_dir / files[0], 1, bright=(3, 28))
    _image(img_dir / files[1], 2)
    rle_mask = _box(2, 20, 9, 30)
    anns = [{"id": 10, "image_id": 1, "category_id": 1, "segmentation": [_poly(16, 4, 28, 12)], "iscrowd": 0},
            {"id": 20, "image_id": 2, "category_id": 1, "segmentation": [_poly(0, 0, 8, 8)], "iscrowd": 0},
            {"id": 21, "image_id": 2, "category_id": 1, "segmentation": _rle(rle_mask), "iscrowd": 0}]
    images = [{"id": i + 1, "file_name": f, "height": S, "width": S} for i, f in enumerate(files)]
    (d / "instances.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                  "categories": [{"id": 1, "name": "person"}]}))
    refs = [
        {"ref_id": 0, "ann_id": 10, "image_id": 1, "split": "train", "category_id": 1,
         "sentences": [{"sent": "the right man", "raw": "The right man.", "tokens": ["the", "right", "man"]},
                       {"sent": "man on the right", "raw": "", "tokens": []}]},
        {"ref_id": 1, "ann_id": 20, "image_id": 2, "split": "val", "category_id": 1,
         "sentences": [{"sent": "held out phrase"}]},
        {"ref_id": 2, "ann_id": 21, "image_id": 2, "split": "train", "category_id": 1,
         "sentences": [{"sent": "the small one"}]},
        {"ref_id": 3, "ann_id": 20, "image_id": 2, "split": "testA", "category_id": 1,
         "sentences": [{"sent": "test phrase"}]},
    ]
    with open(d / f"refs({split_by}).p", "wb") as f:
        pickle.dump(refs, f)
    return {"right": (16, 4, 28, 12), "small": rle_mask}


@pytest.mark.parametrize("name,split_by", [("refcoco", "unc"), ("refcoco+", "unc"), ("refcocog", "umd"),
                                           ("refcocog", "google"), ("refclef", "berkeley")])
def test_refer_reads_train_refs_masks_and_never_flips(tmp_path, name, split_by):
    from agvas.train.data.refer import ReferSource

    expected = _write_refer(tmp_path, name, split_by)
    src = ReferSource(name, tmp_path)
    assert len(src) == 2  # images with a train ref
    seen = Counter()
    for seed in range(40):
        ex = src.sample(random.Random(seed))  # augmentation on: photometric only
        assert ex.supervise == SEG_ONLY and ANCHOR_PHRASE in ex.answer
        phrase = next(p for p in ("the right man", "man on the right", "the small one", "held out phrase", "test phrase")
                      if p in ex.instruction)
        seen[phrase] += 1
        if phrase == "the small one":  # compressed RLE, exact
            np.testing.assert_array_equal(ex.mask, expected["small"])
        else:  # polygon x 16..28, y 4..12; never moved by a flip or rotation
            ys, xs = np.nonzero(ex.mask)
            assert (ys.min(), xs.min()) == (4, 16) and 11 <= ys.max() <= 12 and 27 <= xs.max() <= 28
            a = np.asarray(ex.image).astype(int)
            # the marked pixel stays where it was (jitter may change its value, not its place)
            assert a[3, 28].sum() >= a.reshape(-1, 3).sum(1).max() - 1
    assert set(seen) == {"the right man", "man on the right", "the small one"}  # train split only


def test_refer_errors_name_the_file(tmp_path):
    from agvas.train.data.refer import ReferSource

    with pytest.raises(FileNotFoundError, match=r"refcoco refs: expected one of .*refs\(unc\)\.p"):
        ReferSource("refcoco", tmp_path)
    _write_refer(tmp_path, "refcoco", "unc")
    (tmp_path / "refcoco" / "refs(unc).p").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p: not a REFER refs pickle"):
        ReferSource("refcoco", tmp_path)
    with pytest.raises(ValueError, match="unknown referring dataset"):
        ReferSource("refcocoz", tmp_path)


# ---- semantic segmentation (label maps) -------------------------------------------------------


def test_ade20k_label_map_classes_and_ignore(tmp_path):
    from agvas.train.data.semseg import LabelMapSource

    root = tmp_path / "ADEChallengeData2016"
    label = np.zeros((S, S), np.uint8)  # 0 = other: never a target
    label[:10] = 1  # wall
    label[20:] = 3  # sky
    for stem, lab in (("ADE_train_00000001", label), ("ADE_train_00000002", np.zeros((S, S), np.uint8))):
        _image(root / "images" / "training" / f"{stem}.jpg", 3)
        (root / "annotations" / "training").mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab).save(root / "annotations" / "training" / f"{stem}.png")
    src = LabelMapSource("ade20k", tmp_path, augment=False)  # the parent of ADEChallengeData2016 works too
    assert len(src) == 2
    phrases = set()
    for seed in range(30):
        ex = src.sample(random.Random(seed))  # the all-"other" image is skipped
        phrase = "wall" if " wall " in ex.instruction else "sky"
        assert f" {phrase} " in ex.instruction
        np.testing.assert_array_equal(ex.mask, label == (1 if phrase == "wall" else 3))
        phrases.add(phrase)
        assert ex.supervise == SEG_ONLY
    assert phrases == {"wall", "sky"}


def test_cocostuff_label_map_ignores_unlabeled_and_hyphenated(tmp_path):
    from agvas.train.data.classes import COCOSTUFF_CLASSES
    from agvas.train.data.semseg import LabelMapSource

    assert COCOSTUFF_CLASSES[0] == "person" and COCOSTUFF_CLASSES[156] == "sky" and COCOSTUFF_CLASSES[172] == "wall-other"
    label = np.full((S, S), 255, np.uint8)
    label[:8] = 0  # person
    label[8:16] = 172  # wall-other: ignored as LISA does
    label[16:24] = 156  # sky
    lab_dir = tmp_path / "stuffthingmaps_trainval2017" / "train2017"
    lab_dir.mkdir(parents=True)
    Image.fromarray(label).save(lab_dir / "000000000009.png")
    _image(tmp_path / "train2017" / "000000000009.jpg", 4)
    src = LabelMapSource("cocostuff", tmp_path, augment=False)
    got = {}
    for seed in range(30):
        ex = src.sample(random.Random(seed))
        name = "person" if " person " in ex.instruction else "sky"
        assert f" {name} " in ex.instruction, ex.instruction
        got[name] = ex.mask
    np.testing.assert_array_equal(got["person"], label == 0)
    np.testing.assert_array_equal(got["sky"], label == 156)


# ---- part segmentation (COCO-format JSONs) ----------------------------------------------------


def _write_parts(path: Path, categories: list[dict], file_name: str, anns: list[tuple[int, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "images": [{"id": 7, "file_name": file_name, "height": S, "width": S},
                   {"id": 8, "file_name": "unannotated.jpg", "height": S, "width": S}],
        "annotations": [{"id": i, "image_id": 7, "category_id": c, "segmentation": seg, "iscrowd": 0}
                        for i, (c, seg) in enumerate(anns)],
        "categories": categories}))


def _part_phrases(src, n=40):
    out = {}
    for seed in range(n):
        ex = src.sample(random.Random(seed))
        assert ex.supervise == SEG_ONLY and ANCHOR_PHRASE in ex.answer
        out.setdefault(ex.instruction, ex.mask)
    return out


def test_pascal_part_polygons_union_of_the_part(tmp_path):
    from agvas.train.data.semseg import PartSource

    _write_parts(tmp_path / "train.json", [{"id": 1, "name": "car:wheel"}, {"id": 2, "name": "person:hair"}],
                 "2008_000001.jpg", [(1, [_poly(0, 20, 6, 26)]), (1, [_poly(20, 20, 26, 26)]), (2, [_poly(10, 0, 20, 5)])])
    _image(tmp_path / "VOCdevkit" / "VOC2010" / "JPEGImages" / "2008_000001.jpg", 5)
    src = PartSource("pascal_part", tmp_path, augment=False)
    assert len(src) == 1  # the unannotated image is not an item
    got = _part_phrases(src)
    wheel = [m for instr, m in got.items() if "car wheel" in instr or "the wheel of the car" in instr]
    hair = [m for instr, m in got.items() if "person hair" in instr or "the hair of the person" in instr]
    assert wheel and hair and len(wheel) + len(hair) == len(got)
    assert any("the wheel of the car" in i for i in got) and any("car wheel" in i for i in got)
    for m in wheel:  # both wheels
        assert m[22, 2] and m[22, 22] and not m[10, 12] and 50 <= m.sum() <= 100
    for m in hair:
        assert m[2, 12] and not m[22, 2]


def test_paco_lvis_rle_and_object_categories(tmp_path):
    from agvas.train.data.semseg import PartSource

    lid, mug = _box(4, 4, 12, 10), _box(16, 16, 30, 30)
    root = tmp_path / "paco"
    _write_parts(root / "annotations" / "paco_lvis_v1_train.json",
                 [{"id": 1, "name": "trash_can:lid"}, {"id": 2, "name": "mug"}],
                 "train2017/000000000139.jpg", [(1, _rle(lid)), (2, _rle(mug))])
    _image(tmp_path / "coco" / "train2017" / "000000000139.jpg", 6)  # COCO root next to ROOT
    got = _part_phrases(PartSource("paco_lvis", root, augment=False))
    for instr, m in got.items():
        if "mug" in instr:
            np.testing.assert_array_equal(m, mug)
        else:
            assert "trash can lid" in instr or "the lid of the trash can" in instr
            np.testing.assert_array_equal(m, lid)
    assert any("mug" in i for i in got) and len(got) >= 2


def test_partimagenet_supercategory_names_and_uncompressed_rle(tmp_path):
    from agvas.train.data.semseg import PartSource, part_name

    assert part_name({"name": "Quadruped Head", "supercategory": "Quadruped"}) == ("quadruped", "head")
    assert part_name({"name": "bottle_(glass):cap", "supercategory": ""}) == ("bottle", "cap")
    head = _box(3, 3, 13, 9)
    _write_parts(tmp_path / "annotations" / "train.json",
                 [{"id": 0, "name": "Quadruped Head", "supercategory": "Quadruped"}],
                 "n01440764_10043.JPEG", [(0, _uncompressed_rle(head))])
    _image(tmp_path / "images" / "train" / "n01440764" / "n01440764_10043.JPEG", 7)
    got = _part_phrases(PartSource("partimagenet", tmp_path, augment=False), n=10)
    assert all("quadruped head" in i or "the head of the quadruped" in i for i in got)
    for m in got.values():
        np.testing.assert_array_equal(m, head)


# ---- VQA: whole conversations, every answer supervised ---------------------------------------


def _stub_model():
    from agvas.train.config import tiny_sam
    from agvas.train.tokenizer import add_anchor_tokens, load_tokenizer

    cfg = tiny_sam()
    tok = load_tokenizer(cfg)
    anchors = tuple(add_anchor_tokens(tok))
    ids = SimpleNamespace(image=tok.convert_tokens_to_ids(cfg.image_token), anchors=anchors,
                          eos=tok.convert_tokens_to_ids(cfg.eos_token))
    return SimpleNamespace(cfg=cfg, ids=ids), tok


def _write_vqa(path: Path, image: str, turns: list[tuple[str, str]], lead_gpt: bool = False) -> None:
    conv = [{"from": "gpt", "value": "(ignored)"}] if lead_gpt else []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    path.write_text(json.dumps([{"id": "x", "image": image, "conversations": conv}]))


def test_vqa_multi_turn_labels_every_assistant_turn(tmp_path):
    from agvas.train.data.mixture import IGNORE, example_ids
    from agvas.train.data.sources import VQASource

    _image(tmp_path / "000000033471.jpg", 8)
    turns = [("What colour is the bus?", "It is white."), ("How many people?", "Two people are visible."),
             ("Is it raining?", "No.")]
    _write_vqa(tmp_path / "llava.json", "000000033471.jpg", turns, lead_gpt=True)
    ex = VQASource(tmp_path / "llava.json").example(0, random.Random(0))
    assert ex.turns == turns and ex.supervise == SEG_NONE and "<image>" not in ex.instruction
    model, tok = _stub_model()
    ids, labels = example_ids(ex, model, tok)
    assert ids.count(model.ids.image) == 1 and len(ids) == len(labels)
    text = tok.decode(ids)
    assert text.count("<|im_start|>user") == 3 and text.count("<|im_start|>assistant") == 3
    # labelled: exactly the three answers, each with its EOS; user turns and headers IGNORE
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == [a + model.cfg.eos_token for _, a in turns]
    for q, _ in turns:
        q_ids = tok.encode(q, add_special_tokens=False)
        i = next(i for i in range(len(ids)) if ids[i:i + len(q_ids)] == q_ids)
        assert all(lab == IGNORE for lab in labels[i:i + len(q_ids)])


def test_single_turn_ids_and_labels_unchanged(tmp_path):
    """One-turn examples give exactly the pre-multi-turn ids/labels (prompt + answer + EOS)."""
    from agvas.train.data.mixture import IGNORE, example_ids
    from agvas.train.data.sources import Example
    from agvas.train.reference import prompt_ids

    model, tok = _stub_model()
    ex = Example(Image.new("RGB", (8, 8)), np.zeros((8, 8), bool), "Please segment the anomalies in this image.",
                 "Sure, it is " + ANCHOR_PHRASE + ".", (True, True, True))
    prompt = prompt_ids(tok, model, ex.instruction, 1)
    full = prompt_ids(tok, model, ex.instruction, 1, answer=ex.answer + model.cfg.eos_token)
    assert example_ids(ex, model, tok) == (full, [IGNORE] * len(prompt) + full[len(prompt):])
    # a mask-supervised channel's anchor must be in the answer (its hidden state feeds the mask loss)
    example_ids(Example(ex.image, ex.mask, "Segment the car.", "It is [SEG].", SEG_ONLY), model, tok)
    with pytest.raises(ValueError, match=r"lacks the anchor \[NOR\]\[ANO\] of a mask-supervised channel"):
        example_ids(Example(ex.image, ex.mask, "Segment the car.", "It is [SEG].", (True, True, True)), model, tok)


# ---- LISA-style sampling ----------------------------------------------------------------------


class _Stub:
    def __init__(self, name, n):
        self.name, self.n = name, n

    def __len__(self):
        return self.n

    def example(self, i, rng):
        return self.name


def test_sub_dataset_is_chosen_uniformly_not_by_size():
    sub = SubDatasets({"big": _Stub("big", 10000), "small": _Stub("small", 3)})
    c = Counter(sub.sample(random.Random(k)) for k in range(2000))
    assert 900 < c["small"] < 1100
    weighted = SubDatasets({"big": _Stub("big", 10000), "small": _Stub("small", 3)}, {"small": 3})
    c = Counter(weighted.sample(random.Random(k)) for k in range(2000))
    assert 1400 < c["small"] < 1600
    with pytest.raises(ValueError, match="unknown sub-datasets"):
        SubDatasets({"a": _Stub("a", 1)}, {"b": 1.0})


# ---- the CLI ----------------------------------------------------------------------------------


def _parser():
    from agvas.train.train_cli import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_build_mixture_from_cli_flags(tmp_path):
    from agvas.train.data import synthetic as syn
    from agvas.train.train_cli import build_mixture

    _write_refer(tmp_path / "refer", "refcoco", "unc")
    ade = tmp_path / "ade" / "ADEChallengeData2016"
    _image(ade / "images" / "training" / "ADE_train_1.jpg", 9)
    (ade / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(np.full((S, S), 5, np.uint8)).save(ade / "annotations" / "training" / "ADE_train_1.png")  # tree
    _write_parts(tmp_path / "pp" / "train.json", [{"id": 1, "name": "car:wheel"}], "a.jpg", [(1, [_poly(0, 0, 9, 9)])])
    _image(tmp_path / "pp" / "JPEGImages" / "a.jpg", 10)
    _image(tmp_path / "vqa" / "img.jpg", 11)
    _write_vqa(tmp_path / "vqa" / "llava.json", "img.jpg", [("Q1?", "A1."), ("Q2?", "A2.")])
    _write_vqa(tmp_path / "vqa" / "webad.json", "img.jpg", [("Any defect?", "A scratch.")])
    spec = syn.SyntheticSpec(size=32, n_per_category=2, n_test_per_category=2, n_train_good=0,
                             train_categories=("stripes",), test_categories=("fabric",))
    meta = syn.write_dataset(tmp_path / "anom", spec)
    args = _parser().parse_args([
        "--out", str(tmp_path / "run"), "--seg", str(meta), "--instruct", str(meta),
        "--refer", f"refcoco={tmp_path / 'refer'}", "--sem-seg", f"ade20k={tmp_path / 'ade'}",
        "--sem-seg", f"pascal_part={tmp_path / 'pp'}", "--general-weights", "ade20k=2",
        "--vqa", f"llava={tmp_path / 'vqa' / 'llava.json'}", "--vqa", str(tmp_path / "vqa" / "webad.json")])
    mix = build_mixture(args)
    assert sorted(mix.names) == ["general", "instruct", "seg", "vqa"]
    general = mix.sources[mix.names.index("general")]
    assert general.names == ["refcoco", "ade20k", "pascal_part"] and general.weights == [1.0, 2.0, 1.0]
    assert mix.sources[mix.names.index("vqa")].names == ["llava", "webad"]
    seen = set()
    for k in range(300):
        name, ex = mix.example(k)
        if name == "general":
            seen.add("refcoco" if "right" in ex.instruction or "small one" in ex.instruction
                     else "ade20k" if "tree" in ex.instruction else "pascal_part")
        elif name == "vqa":
            seen.add("llava" if len(ex.turns) == 2 else "webad")
        else:
            seen.add(name)
    assert seen == {"refcoco", "ade20k", "pascal_part", "llava", "webad", "seg", "instruct"}
    a = [(n, e.instruction) for n, e in (mix.example(k) for k in range(20))]
    assert a == [(n, e.instruction) for n, e in (build_mixture(args).example(k) for k in range(20))]
    assert "ade20k 0.50" in mix.describe()


@pytest.mark.parametrize("flags,message", [
    (["--refer", "refcocoz=x"], "--refer 'refcocoz=x': unknown name 'refcocoz'"),
    (["--refer", "somewhere"], "--refer 'somewhere': expected NAME=PATH"),
    (["--sem-seg", "ade20k=/nonexistent"], "ade20k label folder not found"),
])
def test_cli_data_flag_errors(tmp_path, flags, message):
    from agvas.cli import CLIError
    from agvas.train.train_cli import build_mixture

    args = _parser().parse_args(["--out", str(tmp_path), *flags])
    with pytest.raises((CLIError, ValueError, FileNotFoundError), match=message):
        build_mixture(args)
