"""A quiet console (issue 15): `agvas demo`'s quantize step shows its bars and a one-line result;
ONNX Runtime's quantization chatter (root-logger INFO/WARNING lines) goes to the log file the
result names — also when a root console handler at INFO was set up before the step, as ORT's
import-time ``logging.basicConfig`` does."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from contextlib import contextmanager
from types import SimpleNamespace

from test_runtime import tiny_export  # noqa: F401 - the shared export (session fixture)


@contextmanager
def root_console_at_info():
    """The worst case: a root console handler at INFO already there (ORT's basicConfig at import);
    removed and the root level restored afterwards. Yields ``(root, console)``."""
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(name)s [%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(console)
    root.setLevel(logging.INFO)
    try:
        yield root, console
    finally:
        root.removeHandler(console)
        root.setLevel(level)



def test_library_log_moves_root_chatter_to_a_file(tmp_path, capfd):
    from agvas.quiet import library_log

    with root_console_at_info() as (root, console):
        with library_log(tmp_path / "logs" / "step.log") as note:
            logging.info("Quantization parameters for tensor:\"x\" not specified")
            logging.getLogger("some.library").warning("Please consider to run pre-processing")
            import warnings

            warnings.warn("a library warning", UserWarning)
            note("our own step note")
        assert console in root.handlers and root.level == logging.INFO  # put back as found
        logging.info("after the step: the console handler is back")
    err = capfd.readouterr().err
    assert "after the step" in err
    assert "Quantization parameters" not in err and "Please consider" not in err and "a library warning" not in err
    text = (tmp_path / "logs" / "step.log").read_text()
    for s in ("root [INFO] Quantization parameters", "some.library [WARNING] Please consider", "a library warning",
              "our own step note"):
        assert s in text, s


def test_demo_quantize_step_is_quiet(tiny_export, tmp_path, capfd):  # noqa: F811
    from agvas.train.data.synthetic import SyntheticSpec, write_dataset
    from agvas.calibration.demo import LOG_FILE, step_quantize

    out = tmp_path / "demo"
    data = out / "data"
    write_dataset(data, SyntheticSpec(seed=3, n_per_category=2, n_test_per_category=2, n_train_good=2))
    (out / "export").symlink_to(Path(tiny_export).resolve(), target_is_directory=True)
    rows = []
    d = SimpleNamespace(out=out, data_dir=data, meta=data / "meta.json", args=SimpleNamespace(no_progress=False),
                        rows=rows, row=lambda step, result: rows.append((step, "", result)))
    with root_console_at_info():
        step_quantize(d)
    cap = capfd.readouterr()
    console_text = cap.out + cap.err
    lines = [ln for ln in console_text.replace("\r", "\n").splitlines() if ln.strip()]
    chatter = [ln for ln in lines if "[INFO]" in ln or "[WARNING]" in ln or "Please consider" in ln
               or "Quantization parameters" in ln or ln.startswith(("INFO:", "WARNING:"))]
    assert not chatter, chatter[:5]
    log = out / LOG_FILE
    result = [ln for ln in cap.out.splitlines() if ln.startswith("quantize: ")]
    assert len(result) == 1 and str(log) in result[0], cap.out  # the one-line result names the log
    assert "quantize [" in console_text or "quantize:" in console_text  # the bar
    text = log.read_text()
    assert "quantize: gate PASS" in text or "quantize: gate FAIL" in text  # our notes are there
    assert "onnxruntime" in text or "root [" in text  # and the library's records
    print(f"\nconsole: {len(lines)} lines ({len(chatter)} chatter); log {log}: {len(text.splitlines())} lines")
