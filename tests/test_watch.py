"""`agvas inspect --watch DIR` end to end in a subprocess on the trained tiny export: a folder
filled over time (a backlog, files written in place slowly, files renamed in from temporary
names, one truncated for ever, one that is not an image, names to ignore), SIGTERM mid-run,
files arriving while it is down, a restart (polling this time) -> every complete image exactly
once, the bad ones as error rows, no partial files, the hook called once per anomalous image.
No timing assertions: the figures are printed (run with -s to see them)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from test_runtime import tiny_export  # noqa: F401 - the shared export (session fixture)


def _png(i: int) -> bytes:
    """A synthetic image of the trained categories; odd ones carry a defect."""
    from agvas.train.data.synthetic import make_sample
    from agvas.train.train import QUICK_SPEC

    cats, defects = QUICK_SPEC["train_categories"], QUICK_SPEC["train_defects"]
    s = make_sample(cats[i % len(cats)], defects[i % len(defects)] if i % 2 else None, seed=7, index=300 + i)
    buf = io.BytesIO()
    Image.fromarray(s.image).save(buf, format="PNG")
    return buf.getvalue()


def _slow_write(path: Path, data: bytes, chunks: int = 5, pause: float = 0.25) -> None:
    """Written in place, chunk by chunk, with pauses shorter than --settle."""
    step = -(-len(data) // chunks)
    with open(path, "wb") as f:
        for k in range(0, len(data), step):
            f.write(data[k:k + step])
            f.flush()
            time.sleep(pause)


def _renamed_in(path: Path, data: bytes, temp_name: str) -> None:
    tmp = path.with_name(temp_name)
    tmp.write_bytes(data[: len(data) // 2])
    time.sleep(0.3)
    with open(tmp, "ab") as f:
        f.write(data[len(data) // 2:])
    os.rename(tmp, path)


def _paths(out: Path) -> list[str]:
    f = out / "results.jsonl"
    if not f.exists():
        return []
    return [json.loads(x)["path"] for x in f.read_text().splitlines() if x.strip()]


def _wait(proc, cond, what: str, err: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"the watch exited ({proc.returncode}) waiting for {what}:\n{err.read_text()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n{err.read_text()[-3000:]}")


def test_watch_end_to_end_sigterm_and_restart(tiny_export, tmp_path):  # noqa: F811
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (inbox / "cam2").mkdir(parents=True)
    hook_log = tmp_path / "hook.log"
    hook = tmp_path / "hook.py"
    hook.write_text(textwrap.dedent(f"""
        import json, sys
        rec = json.loads(sys.stdin.read())
        assert rec["path"] == sys.argv[1] and rec["verdict"] == "anomalous"
        with open({str(hook_log)!r}, "a") as f:
            f.write(sys.argv[1] + "\\n")
    """))
    data = {i: _png(i) for i in range(12)}
    complete: list[Path] = []

    def put(rel: str, i: int) -> Path:
        p = inbox / rel
        p.write_bytes(data[i])
        complete.append(p)
        return p

    # the backlog found at start-up
    for i, rel in enumerate(("a_000.png", "a_001.png", "cam2/a_000.png")):
        put(rel, i)
    bad = [inbox / "cut.png", inbox / "notes.png"]
    bad[0].write_bytes(data[3][:400])  # truncated for ever
    bad[1].write_text("this is not an image\n")  # an image name, not an image
    (inbox / "readme.txt").write_text("ignored: not an image name\n")
    (inbox / "left_over.png.part").write_bytes(data[4][:100])  # a temporary name never renamed: ignored

    base = [sys.executable, "-m", "agvas.cli", "inspect", "--watch", str(inbox), "--engines", str(tiny_export),
            "--out", str(out), "--settle", "0.6", "--give-up", "6", "--refresh", "1", "--log-every", "3",
            "--threads", "2", "--jsonl", "-", "--on-anomaly", f"{sys.executable} {hook}", "--hook-timeout", "30"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    streams = []

    def start(extra: list[str], k: int):
        so, se = tmp_path / f"stdout{k}", tmp_path / f"stderr{k}"
        streams.append(so)
        return subprocess.Popen(base + extra, stdout=open(so, "wb"), stderr=open(se, "wb"), env=env), se

    t0 = time.time()
    proc, err = start([], 1)
    _wait(proc, lambda: len(_paths(out)) >= 2, "the backlog", err)
    # files arriving: written in place slowly, and renamed in from temporary names
    slow = inbox / "b_slow.png"
    _slow_write(slow, data[5])
    complete.append(slow)
    for i, (rel, temp) in enumerate((("c_ren.png", "c_ren.png.part"), ("cam2/c_ren.png", ".c_ren.png.tmp")), 6):
        _renamed_in(inbox / rel, data[i], temp)
        complete.append(inbox / rel)
    _wait(proc, lambda: len(_paths(out)) >= 5, "the first arrivals", err)
    # SIGTERM while another file is being written in place
    mid = inbox / "d_mid.png"
    writer = threading.Thread(target=_slow_write, args=(mid, data[8], 6, 0.2))
    writer.start()
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, err.read_text()[-3000:]
    writer.join()
    complete.append(mid)
    first_run = _paths(out)
    summary1 = json.loads((out / "summary.json").read_text())
    assert summary1["run"]["watch"]["stopped_by"] == "SIGTERM"
    assert len(first_run) == len(set(first_run)) == summary1["counts"]["images"]

    # while it is down
    put("e_down.png", 9)
    _renamed_in(inbox / "cam2" / "e_down.png", data[10], "e_down.png.filepart")
    complete.append(inbox / "cam2" / "e_down.png")

    proc, err = start(["--poll", "0.3"], 2)
    _wait(proc, lambda: len(_paths(out)) >= 3, "the restart to take over", err)
    put("f_after.png", 11)
    want = {str(p) for p in complete + bad}
    _wait(proc, lambda: set(_paths(out)) >= want, "every image", err)
    time.sleep(0.5)  # a hook in flight
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, err.read_text()[-3000:]
    wall = time.time() - t0

    # every complete image exactly once, the bad ones as error rows, nothing else
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    paths = [r["path"] for r in recs]
    dupes = [p for p, n in Counter(paths).items() if n > 1]
    lost = sorted(want - set(paths))
    assert not dupes and not lost and set(paths) == want
    by = {r["path"]: r for r in recs}
    assert all(by[str(p)]["status"] == "ok" for p in complete)
    assert "truncated" in by[str(bad[0])]["error"] and "not an image" in by[str(bad[1])]["error"]
    assert all("--give-up" in by[str(p)]["error"] for p in bad)
    assert paths[:len(first_run)] == first_run  # the restart appended, never rewrote
    # the stdout stream of both runs: each line once
    streamed = [json.loads(x)["path"] for s in streams for x in s.read_text().splitlines() if x.startswith("{")]
    assert sorted(streamed) == sorted(paths)
    # no partial or temp files, complete PNGs, unique names
    ok = [r for r in recs if r["status"] == "ok"]
    assert len({r["name"] for r in recs}) == len(recs)
    for sub, key in (("masks", "mask"), ("overlays", "overlay")):
        assert sorted(p.name for p in (out / sub).iterdir()) == sorted(Path(r[key]).name for r in ok)
    assert not [p for p in out.rglob(".*")]
    for r in ok:
        with Image.open(out / r["overlay"]) as im:
            im.load()
    # the hook: once per anomalous image
    anomalous = sorted(r["path"] for r in ok if r["verdict"] == "anomalous")
    assert anomalous, "the trained tiny model flags the defect samples"
    calls = hook_log.read_text().splitlines()
    assert sorted(calls) == anomalous
    # csv, summary, report, log
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(recs)
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["images"] == len(want) and s["counts"]["failed"] == len(bad)
    assert s["run"]["skipped_resume"] == len(first_run) and s["run"]["watch"]["observer"].startswith("polling")
    assert s["run"]["watch"]["hooks"]["ok"] == s["run"]["watch"]["hooks"]["run"]
    assert (out / "report.html").read_text().count("<div class='tile'>") == len(anomalous)
    assert "images/s while busy" in (out / "watch.log").read_text()
    lat = s["latency_ms"]["total"]
    print(f"\nwatch e2e: {len(want)} images ({len(complete)} complete, {len(bad)} bad), duplicates {len(dupes)}, "
          f"lost {len(lost)}, anomalous {len(anomalous)} (hook calls {len(calls)}); inspect latency per image "
          f"p50 {lat['p50_ms']:.0f} ms p90 {lat['p90_ms']:.0f} ms; restart run: taken->result p50 "
          f"{s['run']['watch']['latency_ms']['p50_ms']:.0f} ms, arrival->result p50 "
          f"{s['run']['watch']['arrival_to_result_ms']['p50_ms']:.0f} ms; test wall {wall:.0f} s")


def test_watch_usage_errors(tiny_export, tmp_path, capsys):  # noqa: F811
    from agvas.cli import main

    inbox = tmp_path / "in"
    inbox.mkdir()
    base = ["--engines", str(tiny_export), "--out", str(tmp_path / "o")]
    assert main(["inspect", "--watch", str(inbox), *base, "--ray"]) == 2
    assert "--ray cannot be combined with --watch" in capsys.readouterr().err
    assert main(["inspect", str(inbox), "--watch", str(inbox), *base]) == 2
    assert "give no INPUT arguments" in capsys.readouterr().err
    assert main(["inspect", "--watch", str(tmp_path / "nope"), *base]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["inspect", "--watch", str(inbox), *base, "--settle", "5", "--give-up", "2"]) == 2
    assert "must be longer than --settle" in capsys.readouterr().err
    assert main(["inspect", "--watch", str(inbox), "--engines", str(tiny_export), "--out", str(tmp_path)]) == 2
    assert "holds the watched folder" in capsys.readouterr().err
    assert main(["inspect", *base]) == 2
    assert "no INPUT given" in capsys.readouterr().err


def test_candidate_names():
    from agvas.runtime.watch import is_candidate

    assert is_candidate("a.png") and is_candidate("cam2/x.JPG") and is_candidate("a.tiff")
    for rel in (".a.png", "x/.hidden/a.png", "a.png.part", "a.png.tmp", "a.png~", "~a.png", "a.txt", "a.filepart",
                "a.png.crdownload"):
        assert not is_candidate(rel), rel


def test_hook_failures_and_timeouts_are_counted_never_raised(tmp_path):
    from agvas.runtime.watch import Hooks

    seen = tmp_path / "seen"
    script = tmp_path / "hook.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        line = sys.stdin.read()
        mode = sys.argv[1].rsplit("_", 1)[-1]
        if mode == "ok":
            open({str(seen)!r}, "a").write(sys.argv[1] + " " + line)
        elif mode == "fail":
            print("reject gate offline", file=sys.stderr)
            sys.exit(3)
        else:
            time.sleep(30)
    """))
    hooks = Hooks(f"{sys.executable} {script}", 1.0, tmp_path)
    for mode in ("ok", "fail", "hang", "ok"):
        hooks.submit(f"/img_{mode}", '{"verdict": "anomalous"}\n')
    t0 = time.time()
    hooks.close()
    assert time.time() - t0 < 25  # the hanging hook was killed (its timeout is 1 s)
    assert hooks.counts == {"run": 4, "ok": 2, "failed": 1, "timed_out": 1}
    assert seen.read_text().splitlines() == ['/img_ok {"verdict": "anomalous"}'] * 2
    missing = Hooks(str(tmp_path / "no_such_program"), 1.0, tmp_path)
    missing.submit("/img", "{}\n")
    missing.close()
    assert missing.counts["failed"] == 1
