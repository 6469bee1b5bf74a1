"""`agvas doctor` on this CPU machine: a plain table, "GPU: none", exit 0; with `--engines`, where
each engine of an export would run for each provider choice, and why not."""

from __future__ import annotations

import json

from test_runtime import tiny_export  # noqa: F401 - the shared session export

from agvas.cli import main


def test_doctor_on_a_cpu_machine(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(None, 1) for line in out.splitlines() if line and not line.startswith(" ")
                 and len(line.split(None, 1)) == 2)
    assert lines["GPU"].strip() == "none"
    assert lines["onnxruntime"].startswith("1.") and "CPUExecutionProvider" in out
    assert "CUDAExecutionProvider      not in this build" in out


def test_doctor_engines_and_json(tiny_export, capsys):  # noqa: F811
    assert main(["doctor", "--engines", str(tiny_export), "--json"]) == 0
    f = json.loads(capsys.readouterr().out)
    rows = {(r["provider"], r["engine"]): r for r in f["engines"]["rows"]}
    assert all(r["ok"] == "yes" for (p, _), r in rows.items() if p == "cpu")
    assert {e for p, e in rows if p == "cpu"} >= {"vision", "sam_encoder", "spam", "agmd", "llm", "lm_head"}
    assert rows[("cuda", "llm")]["ok"] == "no" and "fp16" in rows[("cuda", "llm")]["runs_on"]
    assert "not built" in rows[("tensorrt-native", "vision")]["runs_on"]
    assert rows[("tensorrt", "vision")]["runs_on"] == "TensorrtExecutionProvider"
    assert main(["doctor", "--engines", str(tiny_export)]) == 0
    assert "usable here: --provider cpu" in capsys.readouterr().out


def test_doctor_refuses_a_non_export(tmp_path, capsys):
    assert main(["doctor", "--engines", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
