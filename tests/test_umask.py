"""Every file the project writes honours the process umask as a plain open() would (issue 15):
agvas.atomic's temp-file-and-rename helpers, the inspect output folder, an export, a checkpoint."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

from conftest import random_image
from test_runtime import tiny_export  # noqa: F401 - the shared export (session fixture)


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[p.relative_to(root).as_posix()] = stat.S_IMODE(p.stat().st_mode)
    return out


def _assert_tree(root: Path, file_mode: int, dir_mode: int, executables: tuple[str, ...] = ()) -> None:
    for rel, mode in _modes(root).items():
        p = root / rel
        want = dir_mode if p.is_dir() else (dir_mode if rel in executables else file_mode)
        assert mode == want, f"{p}: {oct(mode)}, expected {oct(want)}"


def test_atomic_helpers_follow_the_umask(tmp_path):
    from agvas.atomic import atomic_path, current_umask, make_temp_dir, publish_dir, write_text_atomic

    for mask, fmode, dmode in ((0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)):
        with umask(mask):
            assert current_umask() == mask and os.umask(mask) == mask  # reading it left it as it was
            d = tmp_path / f"m{mask:o}"
            write_text_atomic(d / "a.json", "{}")
            with atomic_path(d / "b.png") as tmp:
                Path(tmp).write_bytes(b"x")
            plain = d / "plain.txt"
            plain.write_text("x")
            assert stat.S_IMODE((d / "a.json").stat().st_mode) == fmode == stat.S_IMODE(plain.stat().st_mode)
            assert stat.S_IMODE((d / "b.png").stat().st_mode) == fmode
            work = make_temp_dir(d, ".pub.")
            assert stat.S_IMODE(work.stat().st_mode) == dmode
            (work / "sub").mkdir()
            (work / "sub" / "private.bin").write_bytes(b"x")
            os.chmod(work / "sub" / "private.bin", 0o600)  # as safetensors writes its files
            (work / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(work / "run.sh", 0o700)
            publish_dir(work, d / "pub")
            _assert_tree(d / "pub", fmode, dmode, executables=("run.sh",))


def test_inspect_outputs_are_0644_under_umask_022(tiny_export, tmp_path):  # noqa: F811
    from agvas.cli import main

    img = tmp_path / "in" / "x.png"
    img.parent.mkdir()
    random_image(5, 96, 80).save(img)
    out = tmp_path / "out"
    with umask(0o022):
        assert main(["inspect", str(img), "--engines", str(tiny_export), "--out", str(out), "--threads", "2",
                     "--save-maps"]) == 0
    names = set(_modes(out))
    assert {"results.jsonl", "results.csv", "summary.json", "report.html", "masks/x.png", "overlays/x.png",
            "maps/x.npy"} <= names
    _assert_tree(out, 0o644, 0o755)


def test_export_files_follow_the_umask(tiny_export, tmp_path):  # noqa: F811
    """The session's export was written under this process's umask; a Triton repository built
    from it (same make_temp_dir / publish_dir road) under 022."""
    from agvas.atomic import dir_mode, file_mode
    from agvas.export.triton import write_repository

    _assert_tree(Path(tiny_export), file_mode(), dir_mode())
    with umask(0o022):
        repo = write_repository(tiny_export, tmp_path / "triton")
    _assert_tree(repo, 0o644, 0o755, executables=tuple(p for p, m in _modes(repo).items() if m & 0o100
                                                        and (repo / p).is_file()))
    assert stat.S_IMODE(repo.stat().st_mode) == 0o755


def test_checkpoint_files_are_0644_under_umask_022(tiny_parts, tmp_path):
    from agvas.train.checkpoint import save_checkpoint

    model, tok, proc = tiny_parts
    with umask(0o022):
        ckpt = save_checkpoint(model, tok, proc, tmp_path / "ckpt")
        save_checkpoint(model, tok, proc, tmp_path / "ckpt")  # replacing one keeps the modes too
    assert (ckpt / "model.safetensors").exists()
    _assert_tree(ckpt, 0o644, 0o755)
