"""`agvas inspect --ray` on a local Ray instance (2 CPUs) against single-process `agvas inspect`.

Same verdicts, records and mask/overlay/map bytes; a bad image is an error row, not a failed job;
`--resume` skips finished images; an actor SIGKILLed mid-run is restarted by Ray and every image
is written exactly once. The Ray tests skip when the `ray` extra is not installed; without it,
`--ray` is a one-line usage error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image
from test_runtime import tiny_export  # noqa: F401 - the shared session export

from agvas.cli import main

N_GOOD = 30
RAY_FLAGS = ["--save-maps", "--threads", "1", "--ray-actors", "2", "--ray-cpus-per-actor", "0.75", "--ray-batch", "2", "--ray"]


@pytest.fixture(scope="module")
def ray_local():
    import logging

    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Synthetic defects (anomalous for the trained tiny model) and plain textures, a few sizes,
    plus one file that is not an image."""
    from agvas.train.data.synthetic import make_sample

    folder = tmp_path_factory.mktemp("ray_images")
    cats, defects = ("stripes", "tiles", "marble", "wood", "washer", "pill"), ("colour_spot", "hole", "stain")
    for i in range(N_GOOD):
        if i % 2:
            img = random_image(2000 + i, (64, 96, 80)[i % 3], (64, 80, 96)[i % 3])
        else:
            img = Image.fromarray(make_sample(cats[i % 6], defects[i % 3], 11, i, size=(64, 96, 128)[i % 3]).image)
        img.save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def single(tiny_export, images, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("single") / "out"
    assert main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(out), "--threads", "1",
                 "--save-maps"]) == 1
    return out


def records(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    recs = [json.loads(ln) for ln in lines]
    assert len({r["path"] for r in recs}) == len(recs), "an image was written twice"
    return {r["path"]: r for r in recs}


def assert_same_outputs(got: Path, ref: Path) -> None:
    a, b = records(got), records(ref)
    assert sorted(a) == sorted(b)
    for path, r in b.items():
        g = {k: v for k, v in a[path].items() if k not in ("timings_ms", "worker")}
        assert g == {k: v for k, v in r.items() if k != "timings_ms"}, path
    for kind in ("masks", "overlays", "maps"):
        names = sorted(p.name for p in (ref / kind).iterdir())
        assert names == sorted(p.name for p in (got / kind).iterdir())
        for n in names:
            assert (got / kind / n).read_bytes() == (ref / kind / n).read_bytes(), f"{kind}/{n} differs"


@pytest.mark.slow
def test_ray_matches_single_process(ray_local, tiny_export, images, single, tmp_path):  # noqa: F811
    out = tmp_path / "ray"
    assert main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(out), *RAY_FLAGS]) == 1
    assert_same_outputs(out, single)
    recs = records(out)
    bad = recs[str(images / "broken.png")]
    assert bad["status"] == "error" and "not an image" in bad["error"]
    verdicts = [r["verdict"] for r in recs.values() if r["status"] == "ok"]
    assert len(verdicts) == N_GOOD  # (maps/*.npy above: the probability maps are byte-equal, not only the masks)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == json.loads((single / "summary.json").read_text())["counts"]
    info = summary["run"]["ray"]
    assert info["actors"] == 2 and info["duplicates_dropped"] == 0 and info["lost"] == 0
    assert sum(a["images"] for a in info["per_actor"]) == N_GOOD  # the broken file failed before the actors
    assert all(a["images_per_s"] for a in info["per_actor"]) and summary["run"]["images_per_s"] > 0
    assert (out / "report.html").read_text().count("<div class='tile'>") == verdicts.count("anomalous")

    # --resume: nothing left to do, nothing rewritten
    before = {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(out), "--resume",
                 *RAY_FLAGS]) == 1
    assert json.loads((out / "summary.json").read_text())["run"]["images_this_run"] == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "masks").iterdir()}
    assert_same_outputs(out, single)


@pytest.mark.slow
def test_actor_killed_mid_run_is_restarted(ray_local, tiny_export, images, single, tmp_path):  # noqa: F811
    """SIGKILL one actor's process once a few results are in: Ray restarts it and re-runs the
    batches it held; every image ends up in the output exactly once, equal to single-process."""
    out = tmp_path / "ray"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not killed:
            path = out / "results.jsonl"
            pids = []
            if path.exists():
                for ln in path.read_text().splitlines():
                    try:
                        pids.append(json.loads(ln)["worker"]["pid"])
                    except (ValueError, KeyError):
                        continue
            if len(pids) >= 4:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    rc = main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(out), *RAY_FLAGS])
    t.join(timeout=5)
    assert killed, "the job ended before an actor could be killed"
    assert rc == 1  # the broken file only
    assert_same_outputs(out, single)
    info = json.loads((out / "summary.json").read_text())["run"]["ray"]
    assert info["lost"] == 0 and sum(a["images"] for a in info["per_actor"]) == N_GOOD
    victim = [a for a in info["per_actor"] if killed[0] in a["pids"]]
    assert len(victim) == 1
    assert victim[0]["restarted"] and len(victim[0]["pids"]) == 2, info["per_actor"]
    after = [r for r in records(out).values() if r.get("worker", {}).get("actor") == victim[0]["actor"]
             and r["worker"]["pid"] != killed[0]]
    assert after, "the restarted actor inspected nothing"


def test_gpu_provider_without_gpus_is_refused(ray_local, tiny_export, images, tmp_path, capsys):  # noqa: F811
    assert main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(tmp_path / "o"),
                 "--provider", "cuda", "--ray"]) == 2
    assert "--provider cuda with --ray: the Ray cluster has no GPUs" in capsys.readouterr().err


def test_ray_usage_errors(tiny_export, images, tmp_path, capsys):  # noqa: F811
    # --ray swallowed the only input (INPUT is optional since --watch DIR takes none)
    assert main(["inspect", "--engines", str(tiny_export), "--out", str(tmp_path / "o"), "--ray", str(images)]) == 2
    assert "put --ray after the inputs" in capsys.readouterr().err
    assert main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(tmp_path / "o"),
                 "--ray", str(images)]) == 2
    assert main(["inspect", str(images), "--engines", str(tiny_export), "--out", str(tmp_path / "o"),
                 "--ray-actors", "0", "--ray"]) == 2


def test_without_ray_the_flag_is_a_usage_error(tiny_export, images, tmp_path):  # noqa: F811
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "ray":
                    raise ImportError("No module named 'ray'")
        sys.meta_path.insert(0, Block())
        from agvas.cli import main
        sys.exit(main(["inspect", {str(images)!r}, "--engines", {str(tiny_export)!r}, "--out", {str(tmp_path / "o")!r},
                       "--ray"]))
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().endswith("agvas inspect: error: --ray needs Ray: pip install 'agvas-edge[ray]' (ray[data])")
    assert not (tmp_path / "o").exists()


def test_uri_inputs_are_listed_and_read(images):
    pytest.importorskip("pyarrow", reason="pyarrow (with the ray extra) lists and reads URIs")
    from agvas.runtime.ray_inspect import expand, read_image

    uri = "file://" + str(images)
    items = expand([uri], str(images / "out"))
    assert [Path(it.path).name for it in items] == sorted(p.name for p in images.iterdir())
    assert items[0].path == f"{uri}/{items[0].name}.png" and items[0].name == "broken"
    a = np.asarray(read_image(items[1].path, 10**8))
    assert np.array_equal(a, np.asarray(Image.open(images / "img00.png").convert("RGB")))
    with pytest.raises(ValueError, match=r"broken.png: not an image"):
        read_image(items[0].path, 10**8)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        expand([uri + "/nope"], str(images / "out"))
