"""Writing an output folder atomically: the one mechanism every writer here uses.

    check_destination(out, overwrite, sources=(model_dir,))   # before any work
    with staged_dir(out, overwrite, sources=(model_dir,)) as tmp:
        ...write files into tmp...
    # out now holds exactly what was written into tmp, or (on any error) is as it was

Rules, the same for ``awq-jax quantize --output`` and ``awq-jax import-gguf``:
- a missing or empty ``out`` is created; anything else needs ``overwrite``;
- even with ``overwrite``, only a folder that looks like a model (it holds ``config.json``)
  is replaced: never a file, a symlink, or a folder of other things;
- ``out`` is never the folder of one of the job's inputs (``sources``), nor a folder above
  one: replacing it would delete the input;
- the files are written under a hidden temporary sibling and renamed into place at the end,
  so an interrupted or failed write leaves no partial folder (the CLI turns SIGTERM into an
  exception, so the temporary folder is removed then too);
- the files get the user's usual permissions (``0o666 & ~umask``), whatever the library
  that wrote them chose (safetensors creates its files ``0o600``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["check_destination", "staged_dir"]

CONFIG_NAME = "config.json"


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_destination(
    out: str | os.PathLike[str],
    overwrite: bool,
    *,
    sources: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Refuses an output folder the rules above do not allow; returns it as an absolute path.

    Raises:
      ValueError: ``out`` is, or contains, one of ``sources``.
      FileExistsError: ``out`` exists (and is not an empty folder) without ``overwrite``, or
        is something ``overwrite`` never replaces.
      OSError: the folder that would hold ``out`` cannot be created or written to.
    """
    out = Path(out).absolute()
    target = out.resolve()
    for src in sources:
        src_path = Path(src).resolve()
        if src_path == target or src_path.is_relative_to(target):
            raise ValueError(
                f"the output {out} would replace the input {Path(src)}: choose another folder"
            )
    if _exists(out) and not (out.is_dir() and not out.is_symlink() and not any(out.iterdir())):
        if not out.is_dir() or out.is_symlink():
            raise FileExistsError(f"{out} exists and is not a folder; refusing to replace it")
        if not (out / CONFIG_NAME).is_file():
            raise FileExistsError(
                f"{out} is not empty and has no {CONFIG_NAME}, so it does not look like a model "
                "checkpoint; refusing to overwrite it (remove it yourself if you mean to)"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} already exists; pass --overwrite (overwrite=True in Python) to replace it"
            )
    parent = out.parent
    while not _exists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise FileExistsError(f"cannot create {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: {parent} is not writable")
    return out


@contextlib.contextmanager
def staged_dir(
    out: str | os.PathLike[str],
    overwrite: bool,
    *,
    sources: Iterable[str | os.PathLike[str]] = (),
) -> Iterator[Path]:
    """A temporary folder to write into, renamed to ``out`` when the block ends cleanly.

    Checks ``out`` with `check_destination` first. An existing ``out`` (with ``overwrite``)
    is moved aside, replaced, then deleted; if the rename fails it is put back.
    """
    sources = tuple(sources)
    out = check_destination(out, overwrite, sources=sources)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdtemp makes a private (0700) folder; the one inside it gets the usual permissions.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    existed = _exists(out)
    try:
        tmp = staging / out.name
        tmp.mkdir()
        try:
            yield tmp
        except OSError as e:
            if e.filename is not None:
                raise
            if e.errno is None:
                raise OSError(f"{e} (writing {out})") from e
            raise OSError(e.errno, f"{e.strerror} (writing {out})") from e  # e.g. a full disk
        _usual_permissions(tmp)
        _replace(tmp, out, overwrite, sources, existed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _usual_permissions(folder: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~umask)


def _replace(tmp: Path, out: Path, overwrite: bool, sources: tuple, existed: bool) -> None:
    appeared = FileExistsError(f"{out} appeared while writing it; left as it is")
    if not existed and _exists(out) and not (out.is_dir() and not any(out.iterdir())):
        raise appeared  # another writer finished first
    if not _exists(out):
        try:
            os.rename(tmp, out)  # never clobbers a non-empty folder created meanwhile
        except OSError as e:
            if _exists(out):
                raise appeared from e
            raise
        return
    check_destination(out, overwrite, sources=sources)  # it may have changed meanwhile
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.rename(out, old / out.name)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old / out.name, out)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
