"""A quiet console for long steps: library chatter goes to a log file, the console keeps a
progress bar and a one-line result.

Some libraries talk through the *root* logger: ONNX Runtime's quantization tool calls
``logging.basicConfig(level=INFO)`` when ``matmul_nbits_quantizer`` is imported and then logs one
line per node ("Quantization parameters for tensor ... not specified", "Please consider to run
pre-processing before quantization", ...). :func:`library_log` sends every record that would
reach the console — and Python warnings — to a file for the duration of a step, and puts back
the logging set-up it found afterwards.
"""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

FORMAT = "%(asctime)s %(name)s [%(levelname)s] %(message)s"


def _console(h: logging.Handler) -> bool:
    streams = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None}
    return (isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and id(getattr(h, "stream", None)) in streams)


@contextmanager
def library_log(path: str | Path, level: int = logging.INFO) -> Iterator[Callable[[str], None]]:
    """Route log records (``level`` and above) and warnings to ``path`` (appended) instead of the
    console while the block runs; yields ``note(msg)``, which writes a line of our own there.

    Console handlers are taken off the root logger and off any logger that has its own, and put
    back at the end; a library that calls ``logging.basicConfig`` inside the block finds a
    handler on the root and changes nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = logging.FileHandler(path, encoding="utf-8")
    fh.setFormatter(logging.Formatter(FORMAT))
    fh.setLevel(level)
    root = logging.getLogger()
    loggers = [root] + [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    removed: list[tuple[logging.Logger, logging.Handler]] = []
    for lg in loggers:
        for h in list(lg.handlers):
            if _console(h):
                lg.removeHandler(h)
                removed.append((lg, h))
    own = [lg for lg, _ in removed if lg is not root and not lg.propagate]  # they would not reach the root
    for lg in {id(x): x for x in own}.values():
        lg.addHandler(fh)
    root_level = root.level
    root.addHandler(fh)
    root.setLevel(min(root_level, level) if root_level else level)
    captured = logging.captureWarnings
    was_capturing = bool(getattr(logging, "_warnings_showwarning", None))
    captured(True)
    ours = logging.getLogger("agvas.step")

    def note(msg: str) -> None:
        ours.log(max(level, logging.INFO), msg)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield note
    finally:
        if not was_capturing:
            captured(False)
        root.removeHandler(fh)
        for lg in own:
            lg.removeHandler(fh)
        root.setLevel(root_level)
        for lg, h in removed:
            lg.addHandler(h)
        fh.close()
