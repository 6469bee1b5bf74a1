"""One back-end in its own process (so peak RSS does not mix), driven by :mod:`agvas.benchmarks.run`.

Protocol: JSON lines. The parent writes ``{"cmd": "setup"|"round"|"quit", ...}`` on stdin; the
worker answers one line per command on the *original* stdout (library prints are redirected to
stderr). ``round`` runs one variant once over the image set and returns its samples; the first
recorded round also stores the outputs (masks, anchor states, text) in ``outputs_dir``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .stats import peak_rss_mb


def load_backend(spec: dict[str, Any]):
    from . import backends as B

    kind, a = spec["kind"], spec.get("args", {})
    threads = int(spec.get("threads", 2))
    if kind == "eager":
        return B.EagerBackend(a["checkpoint"], a.get("dtype", "fp32"), threads)
    if kind == "runtime":
        return B.RuntimeBackend(a["export_dir"], a.get("provider", "cpu"), threads, a.get("label"),
                                a.get("engine_files"))
    if kind == "genai":
        return B.GenAIPeer(a["model_dir"], a["precision"], threads)
    raise ValueError(f"unknown back-end kind {kind!r}; expected eager, runtime or genai")


def save_outputs(path: Path, outputs: list, images: list[str] | None = None) -> None:
    """Outputs of one variant (one entry per image, ``images[i]`` the input of ``outputs[i]``) as an ``.npz``."""
    from agvas.atomic import atomic_path

    if images is not None and len(images) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs for {len(images)} images: cannot pair them for agreement")
    arrays: dict[str, np.ndarray] = {}
    for i, o in enumerate(outputs):
        if images is not None:
            arrays[f"image_{i}"] = np.asarray(str(images[i]))
        arrays[f"mask_{i}"] = np.asarray(o.mask, bool)
        arrays[f"verdict_{i}"] = np.asarray(bool(o.verdict))
        arrays[f"text_{i}"] = np.asarray(o.text)
        if o.anchor_states is not None:
            arrays[f"anchors_{i}"] = np.asarray(o.anchor_states, np.float32)
        if o.prob is not None:
            arrays[f"prob_{i}"] = np.asarray(o.prob, np.float16)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, n=np.asarray(len(outputs)), **arrays)


def _batches(images: list[str], batch: int) -> list[list[str]]:
    return [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images]


def serve(stdin, stdout) -> int:
    backend, spec = None, None
    for line in stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "quit":
                return 0
            if cmd == "setup":
                spec = msg["spec"]
                t0 = time.perf_counter()
                backend = load_backend(spec)
                reply = {"ok": True, "load_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
                         "engine_precisions": getattr(backend, "engine_precisions", None)}
            elif cmd == "round":
                from .backends import Variant

                samples, inputs = [], []
                if spec["kind"] == "genai":
                    samples = [backend.run_llm(int(msg["prompt_tokens"]), int(msg["new_tokens"]))]
                else:
                    v = Variant.from_key(msg["variant"])
                    groups = _batches(spec["images"], v.batch) if v.batch > 1 else [spec["images"]]
                    for g in groups:
                        samples += backend.run(v, g)
                        inputs += g
                reply = {"ok": True}
                if msg.get("save_outputs") and spec["kind"] != "genai":
                    out = Path(spec["outputs_dir"]) / f"{spec['name']}__{msg['variant']}.npz"
                    save_outputs(out, [o for s in samples for o in s.outputs], inputs)
                    reply["outputs_path"] = str(out)  # the parent compares only files written in this run
                rows = []
                for s in samples:
                    d = asdict(s)
                    d.pop("outputs")
                    rows.append(d)
                reply |= {"samples": rows, "peak_rss_mb": peak_rss_mb()}
            else:
                raise ValueError(f"unknown worker command {cmd!r}")
        except Exception as e:  # reported to the parent, which records the back-end as failed
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    return 0


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything printed goes to stderr
    sys.stdout = sys.stderr
    return serve(sys.stdin, proto)


if __name__ == "__main__":
    sys.exit(main())
