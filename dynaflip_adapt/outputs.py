"""Where commands write: never over a user's file or folder without an explicit flag.

Output files (a log, a PNG, a JSON report) are refused when they exist unless ``--overwrite``.
An export folder is written only when it is new or empty; with ``--overwrite`` an existing one
must be a previous export, and only the files its manifest lists are replaced: anything else in
the folder is the user's and stays. Nothing here imports torch: commands check their outputs
before anything slow loads.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dynaflip_adapt.errors import InputError

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
