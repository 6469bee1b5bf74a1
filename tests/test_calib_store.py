"""Calibration shards round-trip: engine feeds, reference outputs, readers."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from agvas.calibration.gate import Outputs
from agvas.calibration.readers import StoreReader, truncate_prefill
from agvas.calibration.store import CalibrationStore, StoreError, StoreWriter


def _llm_feeds(rng, s):
    f = {"inputs_embeds": rng.randn(1, s, 8).astype(np.float32), "attention_mask": np.ones((1, s), np.int64)}
    f["past_key_values.0.key"] = np.zeros((1, 2, 0, 4), np.float32)
    return f


def test_shards_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    w = StoreWriter(tmp_path / "cal", {"source": {"export": "x"}}, shard_size=3, store_dtype="float16")
    sent = {"vision": [], "llm": []}
    for i in range(7):
        v = {"pixel_values": rng.randn(2, 3, 4, 4).astype(np.float32) * 3}
        w.add_sample("vision", v)
        sent["vision"].append(v)
        f = _llm_feeds(rng, 5 + i)
        w.add_sample("llm", f)
        sent["llm"].append(f)
    big = {"pixel_values": np.full((1, 3, 4, 4), 1e6, np.float32)}  # does not fit float16: kept float32
    w.add_sample("vision", big)
    sent["vision"].append(big)
    refs = []
    for j in range(5):
        m = rng.rand(7, 5) > 0.6
        o = Outputs(m, bool(m.any()), rng.randn(3, 8).astype(np.float32) if j != 2 else None, f"text {j}")
        w.add_reference(f"img{j}.png", f"/data/img{j}.png", "held_out" if j >= 3 else "calibration", o,
                        prob=rng.rand(7, 5).astype(np.float32))
        refs.append(o)
    store = w.close()
    assert sorted(p.name for p in (tmp_path / "cal" / "inputs").iterdir())[:3] == ["llm-000.npz", "llm-001.npz",
                                                                                  "llm-002.npz"]
    store = CalibrationStore(tmp_path / "cal")  # re-open from disk
    assert store.count("vision") == 8 and store.count("llm") == 7
    assert store.input_names("llm") == sorted(sent["llm"][0])
    for a, b in zip(store.samples("vision"), sent["vision"]):
        assert a["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(a["pixel_values"], b["pixel_values"], rtol=1e-3)  # float16 storage
    for a, b in zip(store.samples("llm"), sent["llm"]):
        assert a["attention_mask"].dtype == np.int64 and a["past_key_values.0.key"].shape == (1, 2, 0, 4)
        np.testing.assert_array_equal(a["attention_mask"], b["attention_mask"])
    back = store.references()
    assert [r.split for r in back] == ["calibration"] * 3 + ["held_out"] * 2
    for r, o in zip(back, refs):
        np.testing.assert_array_equal(r.outputs.mask, o.mask)
        assert r.outputs.verdict == o.verdict and r.outputs.text == o.text
        if o.anchor_states is None:
            assert r.outputs.anchor_states is None
        else:
            np.testing.assert_array_equal(r.outputs.anchor_states, o.anchor_states)
        assert r.prob.shape == (7, 5)
    with pytest.raises(StoreError, match="no samples for engine 'sam_encoder'"):
        store.count("sam_encoder")


def test_reader_restarts_on_deepcopy_and_truncates(tmp_path):
    rng = np.random.RandomState(1)
    w = StoreWriter(tmp_path, {}, shard_size=2, store_dtype="float32")
    for i in range(5):
        w.add_sample("llm", _llm_feeds(rng, 10))
    store = w.close()
    r = StoreReader(store, "llm", limit=4, max_tokens=6)
    first = r.get_next()
    assert first["inputs_embeds"].shape == (1, 6, 8) and first["attention_mask"].shape == (1, 6)
    assert len(r) == 4 and len(list(copy.deepcopy(r))) == 4  # a deep copy starts from the beginning
    assert len(list(r)) == 3
    with pytest.raises(ValueError, match="non-empty past"):
        truncate_prefill({"inputs_embeds": np.zeros((1, 1, 8)), "attention_mask": np.ones((1, 4)),
                          "past_key_values.0.key": np.zeros((1, 2, 3, 4))}, 2)
    with pytest.raises(FileNotFoundError, match="agvas calibrate"):
        CalibrationStore(tmp_path / "nothing")
