"""Where commands write: never over a user's file or folder without an explicit flag.

Output files (a log, a PNG, a JSON report) are refused when they exist unless ``--overwrite``.
An export folder is written only when it is new or empty; with ``--overwrite`` an existing one
must be a previous export, and only the files its manifest lists are replaced: anything else in
the folder is the user's and stays. Nothing here imports torch: commands check their outputs
before anything slow loads.

Room to write: HDF5 cannot survive a failed write (the library crashes the process on the next
flush or close, leaving a half-written file), so HDF5 writers ask `ensure_room` before each
block; other writers run under `writing`, which turns a failed write (disk full, a file-size
limit, a read-only store) into one `RuntimeFailure` naming the file and the room left.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dynaflip_adapt.errors import InputError, RuntimeFailure

EXPORT_KIND = "dynaflip-encoder-export"
EXPORT_MANIFEST = "manifest.json"


def check_output_file(path: str | Path, *, overwrite: bool, option: str = "--out") -> Path:
    """`path` as a file a command may write: refused when it is a folder, or exists and
    `overwrite` is off.

    Raises:
        InputError: The path is a folder, or an existing file without `overwrite`.
    """
    p = Path(path)
    if p.is_dir():
        raise InputError(p, option, "a folder", "a file path")
    if p.exists() and not overwrite:
        raise InputError(p, option, "an existing file", "a new file (or --overwrite to replace it)")
    return p


@dataclass(frozen=True)
class ExportTarget:
    """A checked export folder.

    Attributes:
        path: The folder (absolute).
        previous: Files a previous export wrote there (its manifest's list plus the manifest
            itself), which may be replaced; empty when the folder is new or empty.
    """

    path: Path
    previous: tuple[str, ...] = ()


def _is_cwd_or_above(p: Path) -> bool:
    cwd = Path.cwd().resolve()
    return p == cwd or p in cwd.parents


def check_export_folder(
    path: str | Path, *, overwrite: bool, kind: str = EXPORT_KIND, option: str = "--out"
) -> ExportTarget:
    """`path` as an export folder: new, empty, or (with `overwrite`) a previous export (a
    folder whose manifest has this `kind`: an encoder export, or a backbone bundle).

    Raises:
        InputError: A file, the current folder (or one above it), a folder with other content,
            or a previous export without `overwrite`.
    """
    p = Path(path).expanduser()
    full = p.resolve()
    if p.is_file() or (p.exists() and not p.is_dir()):
        raise InputError(p, option, "an existing file", "a folder path for the export")
    if _is_cwd_or_above(full):
        raise InputError(p, option, "the current folder (or one above it)", "a new or empty folder")
    if not p.exists():
        return ExportTarget(full)
    entries = sorted(e.name for e in p.iterdir())
    if not entries:
        return ExportTarget(full)
    previous = previous_export_files(p, kind)
    if previous is None:
        raise InputError(
            p,
            option,
            f"a folder with {len(entries)} entries that is not a dynaflip-adapt export",
            "a new or empty folder (an export never writes into a folder it did not create)",
        )
    if not overwrite:
        raise InputError(
            p,
            option,
            "a previous export",
            "a new or empty folder, or --overwrite to replace the files that export wrote",
        )
    return ExportTarget(full, tuple(previous))


def previous_export_files(folder: Path, kind: str = EXPORT_KIND) -> list[str] | None:
    """The files a previous export wrote into `folder` (from its manifest), or None when the
    folder holds no readable manifest of that `kind`."""
    try:
        manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict):
        return None
    names = [n for n in files if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]
    return [*names, EXPORT_MANIFEST]


def install_export(staged: Path, target: ExportTarget) -> list[str]:
    """Moves a finished export from `staged` (a sibling temporary folder) into `target`.

    A new folder is renamed into place in one step. Into an existing folder, each new file
    replaces its namesake atomically (manifest last), then files of the previous export that
    the new one does not have are removed; files the previous export did not write are never
    touched.

    Returns:
        The names of the files written.

    Raises:
        InputError: A new file would replace a file the previous export did not write.
    """
    out = target.path
    new = sorted(e.name for e in staged.iterdir())
    if not out.exists():
        os.replace(staged, out)
        return new
    existing = {e.name for e in out.iterdir()}
    clash = sorted((existing & set(new)) - set(target.previous))
    if clash:
        raise InputError(
            out / clash[0],
            "--out",
            "a file the previous export did not write",
            "a folder without it (it is left as it is)",
        )
    for name in sorted(new, key=lambda n: n == EXPORT_MANIFEST):
        os.replace(staged / name, out / name)
    for name in set(target.previous) - set(new):
        stale = out / name
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    shutil.rmtree(staged, ignore_errors=True)
    return new


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 1 MiB blocks (here, free of torch, so that
    the registry can check manifests without importing it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# errno values that mean "no room to write", whatever the writer.
NO_ROOM = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})
# How writers that do not raise OSError report the same: torch.save ("unexpected pos",
# "PytorchStreamWriter failed writing file"), safetensors ("I/O error: ... (os error 28)").
_NO_ROOM_TEXT = (
    "unexpected pos",
    "failed writing file",
    "os error 28",
    "os error 27",
    "os error 122",
    "os error 30",
    "no space left",
    "file too large",
)
# HDF5 metadata per episode and per file (object headers, chunk indexes), on top of the arrays.
HDF5_SLACK = 64 * 1024


def room(path: str | Path) -> int:
    """Bytes that can still be written to `path`: the free space of its file system, capped by
    the process's file-size limit (RLIMIT_FSIZE) less the file's current size."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return free
    if limit == resource.RLIM_INFINITY:
        return free
    size = path.stat().st_size if path.is_file() else 0
    return max(0, min(free, limit - size))


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def ensure_room(
    path: str | Path, nbytes: int, what: str, *, shown: str | Path | None = None
) -> None:
    """Refuses (`RuntimeFailure`, exit 3) before writing `nbytes` of `what` to `path` when the
    file system or the file-size limit leaves less room (with HDF5's slack). `shown` names the
    file in the message when `path` is a temporary file."""
    need = int(nbytes * 1.05) + HDF5_SLACK
    left = room(path)
    if left < need:
        raise RuntimeFailure(
            f"{shown or path}: not enough room to write {what}: needs up to {_mb(need)}, "
            f"{_mb(left)} left (disk full or a file-size limit); nothing was written"
        )


def is_no_room(exc: BaseException) -> bool:
    """Whether `exc` is a write that failed for want of room (or a read-only store)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in NO_ROOM
    if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
        text = str(exc).lower()
        return any(t in text for t in _NO_ROOM_TEXT)
    return False


@contextmanager
def writing(path: str | Path, what: str, *, after: str = "") -> Iterator[None]:
    """Runs a write; a failure for want of room becomes one `RuntimeFailure` (exit 3) naming
    `path`, `what`, the room left and `after` (what state things were left in). Other errors
    pass through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_no_room(exc):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "write failed"
        raise RuntimeFailure(
            f"{path}: could not write {what}: {reason}, {_mb(room(path))} left (disk full, a "
            f"file-size limit or a read-only store){'; ' + after if after else ''}"
        ) from None
