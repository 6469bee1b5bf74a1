"""Atomic file output: write to a temporary file in the same folder, then rename.

Every file and folder the project writes honours the process umask as a plain ``open()`` /
``mkdir()`` would: ``tempfile.mkstemp`` / ``mkdtemp`` create private (0600 / 0700) entries,
so the temporary is given ``0o666 & ~umask`` (files) or ``0o777 & ~umask`` (folders) before it
is renamed into place. Reports, masks and exports are thus readable by the quality engineer's
account, a web server or an NFS share exactly when the umask says so (022 → 0644 / 0755).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask: from ``/proc/self/status`` where Linux shows it (no window in which it
    is changed); elsewhere POSIX can only read it by setting it, ``os.umask(0)`` then restore,
    under a lock so that two readers of this module never see the 0 in between."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def file_mode(executable: bool = False) -> int:
    """The mode ``open()`` would give a new file (``0o777`` base for executables)."""
    return (0o777 if executable else 0o666) & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir()`` would give a new folder."""
    return 0o777 & ~current_umask()


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` the mode a plain ``open()``/``mkdir()`` would have: folders recursively
    (their files too); a file keeps its executable bit if it has one for its owner."""
    path = Path(path)
    fmode, xmode, dmode = file_mode(), file_mode(True), dir_mode()

    def one(p: Path) -> None:
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            return
        if stat.S_ISDIR(st.st_mode):
            os.chmod(p, dmode)
        elif stat.S_ISREG(st.st_mode):
            os.chmod(p, xmode if st.st_mode & stat.S_IXUSR else fmode)

    one(path)
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                one(Path(dirpath) / n)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; on success it is renamed over ``path`` with the
    mode a plain ``open()`` would give it (``0o666 & ~umask``)."""
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())  # the writer may have replaced the file: set the mode on what is there
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p`` (the umask applies as usual)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the mode a plain ``mkdir()`` would give
    (mkdtemp makes it 0700): for folders built in place and renamed at the end."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=make_dirs(parent)))
    os.chmod(tmp, dir_mode())
    return tmp


def publish_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Rename the finished folder ``tmp`` over ``path`` (an existing ``path`` is replaced:
    moved aside, then removed), after giving every entry in it the umask's modes (some writers,
    e.g. safetensors, create 0600 files)."""
    tmp, path = Path(tmp), Path(path)
    apply_umask(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
