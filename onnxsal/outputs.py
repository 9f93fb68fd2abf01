"""Where results are written: output folders are made and tried before any work, so a path the
system refuses (below a file, read-only, in /proc) costs no explaining, converting or exporting,
and a run that fails takes away the folders it made."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Union

from .errors import OutputError


@contextlib.contextmanager
def output_folder(folder: str, keep: bool = True) -> Iterator[str]:
    """The output folder, made with its parents and tried with a scratch file before any work: a path
    the system refuses (below a file, read-only, in /proc) is an OutputError at once, not after
    minutes of RISE or a sanity cascade. If the work then fails, the folders made here go again
    (only those, and only while empty), so a failed run leaves nothing behind; with ``keep=False``
    they go in any case (a try before work that writes them itself)."""
    made = _missing(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        _remove_empty(made)
        raise OutputError(f"cannot make the output folder {folder!r}: {exc.strerror or exc}") from exc
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxsal-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        _remove_empty(made)
        raise OutputError(f"cannot write into the output folder {folder!r}: {exc.strerror or exc}") from exc
    try:
        yield folder
    except BaseException:
        _remove_empty(made)
        raise
    if not keep:
        _remove_empty(made)


def _remove_empty(folders: list[str]) -> None:
    for path in folders:                      # deepest first
        try:
            os.rmdir(path)
        except OSError:
            return


def _missing(folder: str) -> list[str]:
    """The folders ``os.makedirs(folder)`` would make, deepest first."""
    made = []
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        made.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return made


def check_model_path(path: Union[str, os.PathLike]) -> str:
    """A model file's path, tried before the work that makes the model: not a folder, and its folder
    can be made and written. The folders made for the try go again; the write makes them anew."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise OutputError(f"cannot write the model to {path!r}: it is a folder; give a file name")
    try:
        with output_folder(os.path.dirname(os.path.abspath(path)), keep=False):
            pass
    except OutputError as exc:
        raise OutputError(f"cannot write the model to {path!r}: {exc}") from exc
    return path
