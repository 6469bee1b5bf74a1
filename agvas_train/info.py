"""``agvas info``: parameter counts per component for the registered configs (meta device)."""

from __future__ import annotations

import argparse
import json

from .config import CONFIGS, get_config


def config_parameter_counts(name: str) -> dict[str, int]:
    """Counts from a model built on the meta device (no memory, no weights)."""
    from .modeling import build_model, count_parameters

    model, _ = build_model(get_config(name), device="meta")
    return count_parameters(model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", choices=sorted(CONFIGS), help="config(s) to show (default: all)")
    p.add_argument("--json", help="also write the counts to this JSON file")


def run(args) -> int:
    names = args.config or list(CONFIGS)
    rows = {n: config_parameter_counts(n) for n in names}
    cols = ["vision_tower", "projector", "llm", "lm_head", "pixel_encoder", "spam", "refiner", "agmd", "total"]
    print("| config | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for n, r in rows.items():
        print(f"| {n} | " + " | ".join(f"{r[c] / 1e6:,.2f}M" for c in cols) + " |")
    if args.json:
        from agvas.atomic import write_text_atomic

        write_text_atomic(args.json, json.dumps(rows, indent=2))
    return 0
