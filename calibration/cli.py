"""``agvas calibrate``: capture calibration data from the fp32 engines.

    agvas calibrate --engines DIR --images SRC --out CAL [-n 64] [--held-out 16]

Besides the samples (``agvas quantize --calib CAL``), CAL holds the TensorRT INT8 files of the
vision-side engines, ``CAL/tensorrt/<engine>/``: ``tensorrt.cache`` for
``build_engines.sh --int8 --calib-dir CAL`` (trtexec), ``calibration.flatbuffers`` for the ONNX
Runtime TensorRT EP, and the samples the Python builder (``python -m agvas.export.tensorrt EXPORT --int8
--calib-dir CAL``) calibrates on.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engines", required=True, help="the fp32 export directory (agvas export)")
    p.add_argument("--images", required=True, nargs="+",
                   help="production images: folder(s), glob(s), a list file or a meta.json (normal images suffice)")
    p.add_argument("--out", required=True, help="the calibration directory to write")
    p.add_argument("-n", "--num", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--held-out", type=int, default=16,
                   help="further images the gate checks but calibration never sees (default 16)")
    p.add_argument("--held-out-images", nargs="+", default=None,
                   help="take the held-out images from here instead (e.g. a meta.json with anomalous images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image shuffle (default 0)")
    p.add_argument("--provider", default="cpu", help="ONNX Runtime provider for the fp32 run (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="ORT intra-op threads")
    p.add_argument("--vision-tokens", choices=("anyres", "base"), default=None,
                   help="visual-token mode (default: the export's)")
    p.add_argument("--store-dtype", choices=("float16", "float32"), default="float16",
                   help="storage dtype of float inputs (default float16: half the size)")
    p.add_argument("--no-tensorrt", action="store_true",
                   help="skip the TensorRT INT8 files (CAL/tensorrt/<engine>/: tensorrt.cache for build_engines.sh "
                        "--int8 --calib-dir CAL, calibration.flatbuffers for the TensorRT EP)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import shutil
    from pathlib import Path

    from .capture import capture

    if args.num < 1 or args.held_out < 0:
        raise ValueError(f"-n must be >= 1 and --held-out >= 0, got {args.num} and {args.held_out}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"--out {out} exists and is not empty (use --overwrite to replace it)")
        shutil.rmtree(out)
    store = capture(args.engines, args.images, out, n=args.num, held_out=args.held_out,
                    held_src=args.held_out_images, seed=args.seed,
                    provider=args.provider, threads=args.threads, vision_tokens=args.vision_tokens,
                    store_dtype=args.store_dtype, tensorrt=not args.no_tensorrt, progress=not args.no_progress)
    splits = [im["split"] for im in store.images]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}: {splits.count('calibration')} calibration + {splits.count('held_out')} held-out images, "
          + ", ".join(f"{e} {store.count(e)}" for e in store.engines) + f" samples, {size / 1e6:,.1f} MB")
    if store.meta.get("tensorrt"):
        print(f"TensorRT INT8: {out}/tensorrt/<engine>/ — build_engines.sh --int8 --calib-dir {out} (trtexec), "
              f"python -m agvas.export.tensorrt {args.engines} --int8 --calib-dir {out}, or AGVAS_TRT_CALIB_DIR={out} for "
              f"the TensorRT EP")
    return 1 if store.meta.get("skipped") else 0
