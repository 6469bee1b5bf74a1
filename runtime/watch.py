"""``agvas inspect --watch DIR --engines E --out OUT``: continuous inspection of a folder that a
line camera (or its PC, over FTP/SMB) fills all shift long.

What it does, in order:

1. loads the engines once and opens OUT as ``--resume`` does (a restart continues exactly:
   every image already in OUT/results.jsonl is skipped; ``--overwrite`` starts over);
2. inspects what is already in DIR (recursively), then every image that arrives, in arrival order;
3. writes the same outputs as batch `agvas inspect` as they happen — per image the mask and
   overlay atomically, then its results.jsonl line (one ``write``, fsync'd: the commit) and its
   results.csv row; ``--jsonl -`` copies each line to stdout (flushed) for a line system to read;
   summary.json and report.html are rebuilt every ``--refresh`` seconds and at exit;
4. runs ``--on-anomaly CMD`` for each anomalous image (CMD split like a shell would, the image's
   path appended as the last argument, its JSON line on stdin), one at a time in a worker thread
   with ``--hook-timeout``; a failing, missing or hanging hook is logged, never stops inspection;
5. logs a steady-state line every ``--log-every`` images (throughput, per-image latency and
   arrival-to-result latency over those images) to stderr and OUT/watch.log;
6. on SIGTERM or SIGINT finishes the image in hand, waits for the queued hooks, writes the csv,
   summary and report and exits 0 (a second SIGINT aborts at once, exit 130).

When an image is taken
    Only files with an image extension (``agvas.runtime.inputs.IMAGE_EXTS``) are candidates; hidden
    names and folders (``.*``) and temporary names (``*.tmp``, ``*.part``, ``*.partial``,
    ``*.filepart``, ``*.crdownload``, ``*.swp``, ``*~``, ``~*``) are ignored, so a writer that
    writes under a temporary name and renames is picked up at the rename. A file is taken once
    its size and mtime have not changed for ``--settle`` seconds (a rename into DIR counts as
    complete at once) and it decodes. A file that is still changing, empty, or does not decode
    (truncated, not an image) stays waiting — it is tried again whenever it changes — and becomes
    an error row ``--give-up`` seconds after it was first seen. Nothing waits for it meanwhile.
    Each path is inspected once: a file written again later under a name already in
    results.jsonl is not inspected again (give each image its own name).

Events come from watchdog's native observer (inotify on Linux) where it starts; ``--poll S``
(or an observer that cannot start, e.g. no inotify watches left) polls every S seconds instead —
use it on network mounts (SMB/NFS), where inotify does not see writes made by other machines.
A full rescan every ``--rescan`` seconds is the safety net for events lost anyway.

``--ray`` is refused with ``--watch``: Ray Data runs a finite dataset as one job; a folder that
fills one image at a time would need a job (and actor start-up) per arrival, and one machine
keeps up with one camera. Run one `agvas inspect --watch` per line PC / folder, and ``--ray`` on
finished folders in batch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .inputs import IMAGE_EXTS, Item

log = logging.getLogger("agvas.watch")

TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".filepart", ".crdownload", ".download", ".swp", "~")
WATCH_LOG = "watch.log"
_RESCAN = object()  # event-queue token: a folder appeared or was moved in, scan everything


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``--watch`` flags of ``agvas inspect`` (added by ``runtime/cli.py``)."""
    g = p.add_argument_group("watch a folder (production line; see README 'Production line')")
    g.add_argument("--watch", default=None, metavar="DIR",
                   help="inspect what is in DIR, then every image that arrives, until SIGTERM/SIGINT (no INPUT "
                        "arguments; OUT is resumed: a restart continues where it stopped; --overwrite starts over)")
    g.add_argument("--settle", type=float, default=2.0, metavar="S",
                   help="take a file once its size and mtime are unchanged for S seconds (default 2)")
    g.add_argument("--give-up", type=float, default=120.0, metavar="S",
                   help="a file still changing, empty or not decodable S seconds after it appeared becomes an error "
                        "row (default 120; longer than your slowest transfer)")
    g.add_argument("--refresh", type=float, default=30.0, metavar="S",
                   help="rebuild results.csv, summary.json and report.html every S seconds (default 30) and at exit")
    g.add_argument("--jsonl", default=None, metavar="DEST",
                   help="also write each results.jsonl line to DEST as it is committed: '-' = stdout (flushed; the "
                        "closing one-line summary then goes to stderr), or a file to append to")
    g.add_argument("--on-anomaly", default=None, metavar="CMD",
                   help="run CMD IMAGE_PATH for each anomalous image, its JSON line on stdin (e.g. a script that "
                        "signals the reject gate); failures and timeouts are logged, inspection goes on")
    g.add_argument("--hook-timeout", type=float, default=30.0, metavar="S",
                   help="kill an --on-anomaly command after S seconds (default 30)")
    g.add_argument("--log-every", type=int, default=100, metavar="N",
                   help="log throughput and latency over the last N images (default 100)")
    g.add_argument("--poll", type=float, default=None, metavar="S",
                   help="poll DIR every S seconds instead of inotify events (network mounts: SMB/NFS)")
    g.add_argument("--rescan", type=float, default=60.0, metavar="S",
                   help="full rescan of DIR every S seconds, in case an event was lost (default 60)")


# ---- which files ----------------------------------------------------------------------------------

def is_candidate(rel: str) -> bool:
    """``rel`` (a path relative to DIR): an image name, not hidden, not a temporary name."""
    parts = Path(rel).parts
    if not parts or any(p.startswith(".") for p in parts):
        return False
    name = parts[-1].lower()
    if name.startswith("~") or name.endswith(TEMP_SUFFIXES):
        return False
    return name.endswith(IMAGE_EXTS)


def _under(path: str, folder: str | None) -> bool:
    return folder is not None and (path == folder or path.startswith(folder.rstrip(os.sep) + os.sep))


class Watcher:
    """Paths that may have changed under ``root``, from watchdog events (a thread) into a queue;
    ``scan()`` lists every candidate (start-up, rescans, polling without watchdog)."""

    def __init__(self, root: str, skip: str | None, poll: float | None) -> None:
        self.root, self.skip, self.poll = root, skip, poll
        self.events: queue.Queue = queue.Queue()
        self.kind = "none"
        self._observer = None

    def start(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
            from watchdog.observers.polling import PollingObserver
        except ImportError:  # the scan loop polls on its own
            self.kind = f"polling every {self.poll or 1.0:g} s (watchdog not installed)"
            return
        events = self.events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:
                if event.event_type in ("opened", "closed_no_write", "deleted"):
                    return
                if event.is_directory:
                    if event.event_type in ("created", "moved"):
                        events.put(_RESCAN)  # a folder of images moved in at once
                    return
                for p in (event.src_path, getattr(event, "dest_path", "") or ""):
                    if p:
                        events.put((os.fsdecode(p), event.event_type == "moved" and p == event.dest_path))

        attempts = [("polling", lambda: PollingObserver(timeout=self.poll))] if self.poll else \
            [("native", Observer), ("polling", lambda: PollingObserver(timeout=1.0))]
        for label, make in attempts:
            obs = make()
            try:
                obs.schedule(Handler(), self.root, recursive=True)
                obs.start()
            except OSError as e:  # e.g. inotify watch / instance limits
                log.warning("watch: the %s observer did not start (%s); trying the next", label, e)
                continue
            self._observer = obs
            name = type(obs).__name__.replace("Observer", "").lower() or "native"
            self.kind = f"polling every {self.poll or 1.0:g} s" if label == "polling" else name
            return
        self.kind = f"polling every {self.poll or 1.0:g} s (no observer started)"

    @property
    def polls_itself(self) -> bool:
        return self._observer is None

    def scan(self) -> list[str]:
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames
                                 if not d.startswith(".") and not _under(os.path.join(dirpath, d), self.skip))
            for f in filenames:
                p = os.path.join(dirpath, f)
                if is_candidate(os.path.relpath(p, self.root)):
                    found.append(p)
        return sorted(found)

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)


# ---- the on-anomaly hook --------------------------------------------------------------------------

class Hooks:
    """``--on-anomaly``: commands run one at a time in a worker thread, each bounded by the
    timeout (its process group is killed); outcomes are counted and failures logged."""

    def __init__(self, cmd: str, timeout: float, out_dir: Path) -> None:
        self.argv = shlex.split(cmd)
        if not self.argv:
            raise ValueError("--on-anomaly: empty command")
        self.timeout = timeout
        self.env = {**os.environ, "AGVAS_OUT": str(out_dir)}
        self.counts = {"run": 0, "ok": 0, "failed": 0, "timed_out": 0}
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="agvas-hook", daemon=True)
        self._thread.start()

    def submit(self, path: str, line: str) -> None:
        self._q.put((path, line))

    def pending(self) -> int:
        return self._q.qsize()

    def close(self) -> None:
        """Run what is queued, then stop the worker."""
        self._q.put(None)
        self._thread.join()

    def _work(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                self._run(*job)
            except Exception as e:  # noqa: BLE001 - never let a hook stop the worker
                self.counts["failed"] += 1
                log.error("watch: --on-anomaly for %s: %s: %s", job[0], type(e).__name__, e)

    def _run(self, path: str, line: str) -> None:
        self.counts["run"] += 1
        try:
            proc = subprocess.Popen([*self.argv, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.env, start_new_session=True)
        except OSError as e:
            self.counts["failed"] += 1
            log.error("watch: --on-anomaly %s: cannot run: %s", shlex.join(self.argv), e)
            return
        try:
            _, err = proc.communicate(line.encode("utf-8"), timeout=self.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            self.counts["timed_out"] += 1
            log.error("watch: --on-anomaly for %s: killed after %g s (--hook-timeout)", path, self.timeout)
            return
        if proc.returncode:
            self.counts["failed"] += 1
            tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
            log.error("watch: --on-anomaly for %s: exit code %d %s", path, proc.returncode, tail[0][:300])
        else:
            self.counts["ok"] += 1


# ---- the loop -------------------------------------------------------------------------------------

@dataclass
class _Waiting:
    """A candidate file not yet taken."""

    first_seen: float
    sig: tuple | None = None  # (size, mtime_ns) at the last look
    stable_since: float = 0.0
    tried: tuple | None = None  # the sig that last failed to decode
    error: str = ""
    renamed_in: bool = False


class _Stop:
    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict = {}

    def install(self) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _handle(self, signum, _frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the image in hand
        self.signal = signal.Signals(signum).name
        log.info("watch: %s: finishing the image in hand, then the summary", self.signal)

    def __bool__(self) -> bool:
        return self.signal is not None


def _percentiles(vals: list[float]) -> dict:
    from agvas.benchmarks.stats import summarize

    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in summarize(vals).items()}


class _Names:
    """Output stems: the path relative to DIR, ``/`` -> ``__``, extension dropped unless another
    path already has that stem (then kept; then ``-k``). Stable across restarts: the names of the
    images already in results.jsonl are taken."""

    def __init__(self, root: str, used: set[str]) -> None:
        self.root, self.used = root, set(used)

    def __call__(self, path: str) -> str:
        from .inputs import safe_name

        rel = Path(os.path.relpath(path, self.root))
        stem, full = "__".join(rel.with_suffix("").parts), "__".join(rel.parts).replace(".", "_")
        for cand in (safe_name(stem), safe_name(full)):
            if cand not in self.used:
                self.used.add(cand)
                return cand
        k = 2
        while f"{cand}-{k}" in self.used:
            k += 1
        self.used.add(f"{cand}-{k}")
        return f"{cand}-{k}"


def _logging(out_root: Path) -> list[logging.Handler]:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr),
                                       logging.FileHandler(out_root / WATCH_LOG, encoding="utf-8")]
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    return handlers


def check_args(args: argparse.Namespace) -> None:
    if getattr(args, "ray", None) is not None:
        raise ValueError("--ray cannot be combined with --watch: Ray Data runs a finite set of images as one job, "
                         "while a watch takes images one by one as they arrive (a job and actor start-up per "
                         "image); run one `agvas inspect --watch` per line PC or folder, and --ray on finished "
                         "folders (see README 'Production line')")
    if args.inputs:
        raise ValueError(f"--watch {args.watch}: give no INPUT arguments (got {args.inputs[0]!r}); the folder is "
                         "the input")
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    for flag, v in (("--settle", args.settle), ("--give-up", args.give_up), ("--refresh", args.refresh),
                    ("--hook-timeout", args.hook_timeout), ("--rescan", args.rescan),
                    ("--poll", args.poll if args.poll is not None else 1.0)):
        if not v > 0:
            raise ValueError(f"{flag} must be > 0, got {v}")
    if args.settle >= args.give_up:
        raise ValueError(f"--give-up ({args.give_up:g} s) must be longer than --settle ({args.settle:g} s)")
    if args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")


def run(args: argparse.Namespace) -> int:
    """``agvas inspect --watch DIR``: validated arguments of ``runtime/cli.py`` -> exit code
    (0 after SIGTERM/SIGINT; 2 for usage and engine errors before the watch starts)."""
    from agvas.imageio import ImageError, load_image

    from .common import load_inspector, run_settings
    from .outputs import OutputDir
    from .report import build_summary, render_html

    check_args(args)
    root = Path(args.watch).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"--watch {args.watch}: no such folder")
    root = root.resolve()
    if _under(str(root), str(Path(args.out).resolve())):
        raise ValueError(f"--out {args.out}: holds the watched folder {root}; put the outputs elsewhere")
    if args.on_anomaly is not None and not shlex.split(args.on_anomaly):
        raise ValueError("--on-anomaly: empty command")
    stop = _Stop()
    stop.install()  # a SIGTERM while the engines load: the watch stops as soon as it has started
    try:
        insp = load_inspector(args)
        out = OutputDir(args.out, resume=not args.overwrite, overwrite=args.overwrite, save_maps=args.save_maps,
                        live_csv=True)
        stream = None
        if args.jsonl == "-":
            stream = sys.stdout
        elif args.jsonl:
            try:
                stream = open(args.jsonl, "a", encoding="utf-8")  # noqa: SIM115 - closed in finally
            except OSError as e:
                raise ValueError(f"--jsonl {args.jsonl}: {e.strerror or e}") from None
    except BaseException:
        stop.restore()
        raise
    handlers = _logging(out.root)
    hooks = Hooks(args.on_anomaly, args.hook_timeout, out.root) if args.on_anomaly else None
    skip = str(out.root.resolve())
    watcher = Watcher(str(root), skip, args.poll)
    names = _Names(str(root), {r.get("name", "") for r in out.records.values()})
    resumed = len(out.records)
    out.write_reports(list(out.records.values()), None, None)  # results.csv from the records, then appended
    settings = run_settings(args, insp)

    waiting: dict[str, _Waiting] = {}
    n_done = n_fail = n_anom = n_gave_up = 0
    lat: list[float] = []  # ms from taken to committed, per image of this run
    e2e: list[float] = []  # ms from first seen to committed
    window: list[tuple[float, float]] = []  # (latency, e2e) since the last log line
    busy_s = 0.0
    t_start = time.time()
    last = {"refresh": time.monotonic(), "rescan": time.monotonic(), "poll": 0.0, "window": time.monotonic()}
    look_every = max(0.05, min(0.5, args.settle / 4))

    def consider(path: str, renamed: bool = False) -> None:
        path = os.path.abspath(path)
        if path in out.records or _under(path, skip) or not _under(path, str(root)):
            return
        if not is_candidate(os.path.relpath(path, root)):
            return
        w = waiting.get(path)
        if w is None:
            waiting[path] = w = _Waiting(first_seen=time.monotonic())
        w.renamed_in |= renamed

    def summary_now() -> dict:
        wall = time.time() - t_start
        run_info = {"images_this_run": n_done, "skipped_resume": resumed, "failed_this_run": n_fail,
                    "wall_s": round(wall, 3), "images_per_s": round(n_done / busy_s, 3) if busy_s > 0 else None,
                    "watch": {"dir": str(root), "observer": watcher.kind, "settle_s": args.settle,
                              "give_up_s": args.give_up, "waiting": len(waiting), "gave_up": n_gave_up,
                              "busy_s": round(busy_s, 3), "stopped_by": stop.signal,
                              "latency_ms": _percentiles(lat), "arrival_to_result_ms": _percentiles(e2e),
                              "hooks": dict(hooks.counts) if hooks else None,
                              "note": "images_per_s counts busy time only (idle waits for images excluded); "
                                      "latency_ms = taken -> committed, arrival_to_result_ms = first seen -> "
                                      "committed (includes --settle)"}}
        return build_summary(list(out.records.values()), settings, run_info, None)

    def refresh() -> None:
        summary = summary_now()
        records = list(out.records.values())
        out.write_reports(records, summary, render_html(summary, records, out.root, inputs_root=root))
        last["refresh"] = time.monotonic()

    def committed(rec: dict, w: _Waiting, taken: float) -> None:
        nonlocal n_done, n_fail, n_anom, stream
        now = time.monotonic()
        n_done += 1
        n_fail += rec["status"] != "ok"
        anomalous = rec.get("verdict") == "anomalous"
        n_anom += anomalous
        line = json.dumps(rec)
        if stream is not None:
            try:
                stream.write(line + "\n")
                stream.flush()
            except (BrokenPipeError, OSError) as e:  # the reader went away: inspection goes on
                log.error("watch: --jsonl %s: %s; no longer streaming", args.jsonl, e)
                stream = None
        if anomalous and hooks:
            hooks.submit(rec["path"], line + "\n")
        if taken:
            lat.append((now - taken) * 1000.0)
            e2e.append((now - w.first_seen) * 1000.0)
            window.append((lat[-1], e2e[-1]))
        if len(window) >= args.log_every:  # the steady-state line
            span = now - last["window"]
            ls, es = _percentiles([x[0] for x in window]), _percentiles([x[1] for x in window])
            log.info("watch: %d images this run (%d anomalous, %d failed); last %d: %.2f images/s while busy, "
                     "%.2f images/s wall; latency per image p50 %.0f ms p90 %.0f ms; arrival->result p50 %.0f ms "
                     "p90 %.0f ms; %d waiting", n_done, n_anom, n_fail, len(window),
                     len(window) / (ls["mean_ms"] * len(window) / 1000.0), len(window) / span if span > 0 else 0.0,
                     ls["p50_ms"], ls["p90_ms"], es["p50_ms"], es["p90_ms"], len(waiting))
            window.clear()
            last["window"] = now

    def give_up(path: str, w: _Waiting, reason: str) -> None:
        nonlocal n_gave_up
        n_gave_up += 1
        rec = out.write_error(Item(path, names(path)),
                              f"{path}: not taken after {args.give_up:g} s (--give-up): {reason}")
        log.warning("watch: %s", rec["error"])
        del waiting[path]
        committed(rec, w, 0.0)

    def look(now: float) -> list[str]:
        """Stat the waiting files; give up on the old ones; the paths ready for a try, oldest first."""
        ready = []
        for path, w in list(waiting.items()):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                del waiting[path]  # renamed away or deleted before it was taken
                continue
            except OSError as e:
                w.error = f"cannot stat: {e}"
                st = None
            if st is not None:
                sig = (st.st_size, st.st_mtime_ns)
                if sig != w.sig:
                    w.sig, w.stable_since = sig, now
                stable = w.renamed_in or now - w.stable_since >= args.settle  # a rename into DIR completes a file
                if st.st_size > 0 and stable and w.tried != sig:
                    ready.append(path)
                    continue
            if now - w.first_seen >= args.give_up:
                if st is None:
                    reason = w.error
                elif st.st_size == 0:
                    reason = "empty file (0 bytes)"
                elif w.tried == w.sig:
                    reason = w.error.replace(f"{path}: ", "")
                else:
                    reason = f"still changing (size {st.st_size} bytes)"
                give_up(path, w, reason)
        ready.sort(key=lambda p: (waiting[p].first_seen, p))
        return ready

    def take(paths: list[str]) -> None:
        nonlocal busy_s
        t0 = time.monotonic()
        loaded = []
        for path in paths:
            w = waiting[path]
            try:
                img = load_image(path, max_pixels=args.max_pixels)
                st = os.stat(path)
            except (ImageError, OSError) as e:
                if not os.path.exists(path):
                    del waiting[path]
                    continue
                w.tried, w.error = w.sig, str(e)  # incomplete or bad: tried again when it changes
                continue
            if (st.st_size, st.st_mtime_ns) != w.sig:
                continue  # changed while it was read: not complete after all
            loaded.append((path, img))
        if not loaded:
            return
        items = [Item(p, names(p)) for p, _ in loaded]
        for i, res in insp.stream([img for _, img in loaded], batch_size=args.batch, overlap=False):
            it, w = items[i], waiting.pop(items[i].path)
            if isinstance(res, Exception):
                rec = out.write_error(it, res)
            else:
                rec = out.write_result(it, res)
            committed(rec, w, t0)
            busy_s += time.monotonic() - t0
            t0 = time.monotonic()
            if stop:
                break  # the rest of this chunk waits for the next run

    code = 0
    try:
        watcher.start()
        for p in watcher.scan():
            consider(p)
        log.info("watch: %s (%s), %d waiting, %d already in %s; engines %s (%s); stop with SIGTERM or Ctrl-C",
                 root, watcher.kind, len(waiting), resumed, out.root, settings["engines"], args.provider)
        while not stop:
            try:
                ev = watcher.events.get(timeout=look_every)
                while True:
                    if ev is _RESCAN:
                        for p in watcher.scan():
                            consider(p)
                    else:
                        consider(*ev)
                    ev = watcher.events.get_nowait()
            except queue.Empty:
                pass
            now = time.monotonic()
            if now - last["rescan"] >= ((args.poll or 1.0) if watcher.polls_itself else args.rescan):
                for p in watcher.scan():
                    consider(p)
                last["rescan"] = now
            if stop:
                break
            if waiting and now - last["poll"] >= look_every:
                last["poll"] = now
                ready = look(now)
                if ready:
                    take(ready[:args.batch])
            if time.monotonic() - last["refresh"] >= args.refresh:
                refresh()
    except KeyboardInterrupt:
        code = 130
        log.warning("watch: interrupted")
    finally:
        stop.restore()
        watcher.stop()
        if hooks:
            if hooks.pending():
                log.info("watch: running %d queued --on-anomaly hooks", hooks.pending())
            hooks.close()
        refresh()
        c = json.loads((out.root / "summary.json").read_text())["counts"]
        msg = (f"{c['images']} images: {c['anomalous']} anomalous, {c['normal']} normal, {c['failed']} failed; "
               f"{n_done} this run, {len(waiting)} left waiting -> {out.root / 'report.html'}")
        log.info("watch: stopped (%s): %s", stop.signal or "error", msg)
        print(msg, file=sys.stderr if args.jsonl == "-" else sys.stdout, flush=True)
        if stream is not None and stream is not sys.stdout:
            stream.close()
        for h in handlers:
            log.removeHandler(h)
            h.close()
    return code
