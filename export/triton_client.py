"""Send images to the ``agvas`` model of a Triton server; receive masks and verdicts.

::

    pip install 'agvas-edge[triton]'       # tritonclient[http]
    python -m agvas.export.triton_client part.png --url localhost:8000 --mask part_mask.png
    python -m agvas.export.triton_client part.png --perf-data perf.json   # input file for perf_analyzer

The image travels encoded (PNG/JPEG bytes, one per request); the server decodes, orients and
converts it exactly as ``agvas inspect`` does.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from pathlib import Path

import numpy as np

MODEL = "agvas"
OUTPUTS = ("mask", "prob", "verdict", "area_px", "max_score", "text")


def image_tensor(data: bytes) -> np.ndarray:
    """The ``image`` input: BYTES, shape [1, 1] (a batch of one request)."""
    return np.array([[data]], dtype=object)


def perf_analyzer_data(data: bytes) -> dict:
    """``perf_analyzer --input-data`` JSON for one image: a BYTES element is its 4-byte
    little-endian length followed by the bytes, base64-encoded."""
    return {"data": [{"image": {"content": {"b64": base64.b64encode(struct.pack("<I", len(data)) + data).decode()},
                                "shape": [1]}}]}


def infer(client, data: bytes, model: str = MODEL) -> dict:
    """One request with ``tritonclient.http``; the outputs without the batch axis."""
    import tritonclient.http as http

    x = http.InferInput("image", [1, 1], "BYTES")
    x.set_data_from_numpy(image_tensor(data))
    result = client.infer(model, [x], outputs=[http.InferRequestedOutput(n) for n in OUTPUTS])
    out = {n: result.as_numpy(n)[0] for n in OUTPUTS}
    return {"mask": out["mask"].astype(bool), "prob": out["prob"], "verdict": bool(out["verdict"][0]),
            "area_px": int(out["area_px"][0]), "max_score": float(out["max_score"][0]),
            "text": out["text"][0].decode("utf-8")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agvas.export.triton_client", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files to inspect")
    p.add_argument("--url", default="localhost:8000", help="Triton HTTP endpoint (default localhost:8000)")
    p.add_argument("--model", default=MODEL, help=f"entry model name (default {MODEL})")
    p.add_argument("--mask", help="write the (first) image's mask here as a PNG (0/255)")
    p.add_argument("--perf-data", help="only write perf_analyzer input data for the first image to this JSON file")
    args = p.parse_args(argv)
    if args.perf_data:
        from agvas.atomic import write_text_atomic

        write_text_atomic(args.perf_data, json.dumps(perf_analyzer_data(Path(args.images[0]).read_bytes())))
        print(f"perf_analyzer -m {args.model} --input-data {args.perf_data} -u {args.url} --concurrency-range 1:4")
        return 0
    import tritonclient.http as http
    from PIL import Image

    client = http.InferenceServerClient(url=args.url)
    failed = 0
    for i, path in enumerate(args.images):
        try:
            r = infer(client, Path(path).read_bytes(), args.model)
        except Exception as e:  # noqa: BLE001 - the server's per-request error, e.g. not an image
            print(f"{path}: error: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}", file=sys.stderr)
            failed += 1
            continue
        print(json.dumps({"image": path, "verdict": "anomalous" if r["verdict"] else "normal",
                          "area_px": r["area_px"], "max_score": round(r["max_score"], 4), "text": r["text"]}))
        if args.mask and i == 0:
            from agvas.atomic import atomic_path

            with atomic_path(args.mask, suffix=".png") as tmp:
                Image.fromarray(r["mask"].astype(np.uint8) * 255).save(tmp, format="PNG")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
