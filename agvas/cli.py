"""The ``agvas`` console script.

Each verb lives in the part of the project it belongs to and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. This file only dispatches, importing the
verb's module lazily so that ``agvas inspect`` on an edge box never imports torch.
Exit codes: 0 success, 1 partial failure (e.g. some images failed), 2 usage / input error.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("agvas.train.train_cli", "train AG-VAS (tiny from scratch, real configs with LoRA)"),
    "eval": ("agvas.train.eval_cli", "evaluate a checkpoint or an export on a meta.json test split"),
    "export": ("agvas.export.cli", "split a checkpoint into ONNX engines + manifest (and TensorRT/Triton recipes)"),
    "calibrate": ("agvas.calibration.cli", "capture calibration data from the fp32 engines"),
    "quantize": ("agvas.calibration.quantize_cli", "quantize an export (int4/int8/fp16) behind an accuracy gate"),
    "inspect": ("agvas.runtime.cli", "batch-inspect images with an export directory"),
    "doctor": ("agvas.runtime.doctor", "what this machine can run: ONNX Runtime providers, CUDA, TensorRT, GPU"),
    "bench": ("agvas.benchmarks.cli", "measure latency / throughput / memory / agreement per back-end"),
    "demo": ("agvas.train.demo", "the embedded default: synthetic data -> train tiny -> eval -> export -> inspect"),
    "info": ("agvas.train.info", "parameter counts and memory of the registered configs"),
}


# a missing top-level module -> the extra that brings it (pyproject.toml)
EXTRA_OF = {"torch": "train", "transformers": "train", "peft": "train", "accelerate": "train",
            "segment_anything": "train", "skimage": "train", "pycocotools": "train", "safetensors": "train",
            "onnxscript": "export", "onnx_ir": "export", "onnxruntime_genai": "export",
            "onnxruntime": "cpu", "ray": "ray", "tritonclient": "triton"}


class CLIError(Exception):
    """A one-line error for the user (bad input); exit code 2."""


def _load(verb: str):
    module, _ = VERBS[verb]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            return None
        raise


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="agvas", description="AG-VAS Edge: zero-shot anomaly segmentation "
                                "from training to edge inference.")
    p.add_argument("--version", action="version", version=f"agvas {__version__}")
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for verb, (_, help_) in VERBS.items():
        sp = sub.add_parser(verb, help=help_, description=help_)
        sp.set_defaults(_verb=verb)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] == "--version" or argv[0] not in VERBS:
        parser.parse_args(argv)  # prints version or the usage error (exit 2)
        return 2
    verb = argv[0]
    try:
        mod = _load(verb)
    except ModuleNotFoundError as e:  # a dependency of an extra this install does not have
        extra = EXTRA_OF.get(e.name.split(".")[0] if e.name else "", "")
        print(f"agvas {verb}: needs the Python package {e.name!r}, which is not installed"
              + (f" (pip install 'agvas-edge[{extra}]')" if extra else ""), file=sys.stderr)
        return 2
    vp = argparse.ArgumentParser(prog=f"agvas {verb}", description=VERBS[verb][1])
    if mod is None:
        vp.parse_args(argv[1:])
        print(f"agvas {verb}: not built yet", file=sys.stderr)
        return 2
    mod.add_arguments(vp)
    args = vp.parse_args(argv[1:])
    try:
        return int(mod.run(args) or 0)
    except KeyboardInterrupt:
        print(f"agvas {verb}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, FileNotFoundError, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"agvas {verb}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
