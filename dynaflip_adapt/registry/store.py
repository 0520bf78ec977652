"""The one place that decides where the MLflow store and the tool's files live.

Order: an explicit ``--tracking-uri``, else ``MLFLOW_TRACKING_URI``, else an embedded sqlite
registry under the home directory (``$DYNAFLIP_HOME``, default ``~/.dynaflip``). URIs are always
made absolute: MLflow 3 resolves a relative sqlite path against the current directory and silently
switches to the deprecated file store when a ``./mlruns`` folder exists (docs/deploy.md).

This module imports nothing heavy: it runs at CLI start-up.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynaflip_adapt.errors import InputError

HOME_ENV = "DYNAFLIP_HOME"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
_SQLITE_PREFIX = "sqlite:///"


@dataclass(frozen=True)
class Store:
    """Where a command reads and writes.

    Attributes:
        home: The tool's home directory (embedded registry, locks, caches).
        tracking_uri: Absolute MLflow tracking URI (also used as registry URI).
        artifact_root: Absolute artifact location for new experiments (a ``file://`` URI when the
            store is embedded; ``None`` lets a tracking server decide).
        source: How the URI was chosen: ``"option"``, ``"env"`` or ``"embedded"``.
    """

    home: Path
    tracking_uri: str
    artifact_root: str | None
    source: str

    @property
    def lock_path(self) -> Path:
        """File lock that serialises registry writes from several processes."""
        return self.home / "registry.lock"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        d = asdict(self)
        d["home"] = str(self.home)
        d["lock_path"] = str(self.lock_path)
        return d


def home_dir(env: Mapping[str, str] | None = None) -> Path:
    """Returns the absolute home directory (not created)."""
    source: Mapping[str, str] = os.environ if env is None else env
    raw = source.get(HOME_ENV) or "~/.dynaflip"
    return Path(raw).expanduser().resolve()


def absolutize_uri(uri: str, *, cwd: Path | None = None) -> str:
    """Makes a tracking URI absolute.

    ``sqlite:///rel.db`` becomes ``sqlite:////abs/rel.db``; a bare path becomes a ``file://`` URI;
    ``http(s)://`` and other schemes are returned unchanged.

    Raises:
        InputError: When the URI is empty.
    """
    uri = uri.strip()
    if not uri:
        raise InputError(None, "tracking-uri", "an empty string", "a tracking URI")
    base = (cwd or Path.cwd()).resolve()
    if uri.startswith(_SQLITE_PREFIX):
        path = uri[len(_SQLITE_PREFIX) :]
        if path.startswith("/"):
            return uri
        return _SQLITE_PREFIX + str((base / path).resolve())
    if uri.startswith("file:"):
        path = uri[len("file:") :]
        if path.startswith("/"):
            return "file:///" + path.lstrip("/")
        return (base / path).resolve().as_uri()
    if "://" not in uri:
        return (base / uri).resolve().as_uri()
    return uri


def resolve_store(
    tracking_uri: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Store:
    """Resolves the store for a command.

    Args:
        tracking_uri: Value of ``--tracking-uri``, if given.
        env: Environment to read (defaults to ``os.environ``).
        cwd: Directory relative URIs are resolved against (defaults to the current one).

    Returns:
        The resolved `Store`; nothing is created on disk.
    """
    source: Mapping[str, str] = os.environ if env is None else env
    home = home_dir(source)
    if tracking_uri:
        uri = absolutize_uri(tracking_uri, cwd=cwd)
        return Store(home, uri, _beside_database(uri), "option")
    if source.get(TRACKING_ENV):
        uri = absolutize_uri(source[TRACKING_ENV], cwd=cwd)
        return Store(home, uri, _beside_database(uri), "env")
    db = home / "mlflow.db"
    return Store(home, _SQLITE_PREFIX + str(db), (home / "artifacts").as_uri(), "embedded")


def _beside_database(uri: str) -> str | None:
    """Artifacts of a sqlite store go to ``artifacts/`` beside the database file, as for the
    embedded store (MLflow would put them in ``./mlruns`` of whatever folder a command runs in);
    a tracking server decides for itself (None)."""
    if not uri.startswith(_SQLITE_PREFIX):
        return None
    return (Path(uri[len(_SQLITE_PREFIX) :]).parent / "artifacts").as_uri()
