"""Locates the files shipped beside the code: `recipes/` and `data_schemas/`.

In a wheel they are copied to ``dynaflip_adapt/_shipped/``; in a source checkout (editable
install, tests) they are the top-level folders of the repository.
"""

from __future__ import annotations

from pathlib import Path

from dynaflip_adapt.errors import RuntimeFailure

_PKG = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """Returns the folder of shipped files called `name` (``recipes`` or ``data_schemas``).

    Raises:
        RuntimeFailure: When the installation lacks the folder.
    """
    for candidate in (_PKG / "_shipped" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise RuntimeFailure(
        f"{name}/: not found beside the package ({_PKG}); the installation is incomplete, "
        "reinstall dynaflip-adapt"
    )
