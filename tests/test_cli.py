import subprocess
import sys

from agvas.cli import VERBS, main


def test_help_lists_verbs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("train", "eval", "export", "calibrate", "quantize", "inspect", "bench", "demo"):
        assert verb in out and verb in VERBS


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "agvas", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "inspect" in r.stdout


def test_unknown_verb_exit_code(capsys):
    import pytest

    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
