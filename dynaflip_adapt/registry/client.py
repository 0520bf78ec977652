"""The only module that talks to MLflow.

Backbones and adapters are registered models; a version's source is the run artifact folder that
holds its bundle. Versions carry lineage as tags. Registry writes are serialised by a file lock
under the tool's home (sqlite answers "database is locked" otherwise, and alias moves must not
interleave).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaflip_adapt.errors import InputError, RuntimeFailure
from dynaflip_adapt.outputs import sha256_file
from dynaflip_adapt.registry.store import Store

_RAISE = object()  # `Registry._call`: no default, a missing resource is an error too
RUN_PAGE = 1000  # runs per search page (history is paged, never truncated)

BACKBONE_MODEL = "dynaflip-backbone"
BASE_ALIAS = "base"
PRETRAIN_EXPERIMENT = "dynaflip-pretrain"

# What each registered model holds, shown in the MLflow UI.
# A site's promotion/rollback requests: `dynaflip-events-<site>` (see `lifecycle`).
EVENTS_PREFIX = "dynaflip-events-"
MODEL_DESCRIPTIONS = {
    "dynaflip-backbone": "DynaFLIP image/language/flow backbone bundles (alias `base`).",
    "dynaflip-adapter": "Per-site LoRA adapters of a backbone (alias `prod-<site>` per site).",
    "dynaflip-policy": "Downstream policy heads pinned to a backbone (+ adapter) and a site.",
}

# HTTP policy (MLflow reads these variables at each request; a user's own values always win).
# First contact is quick: a server that does not answer fails the command in about 3 x the
# timeout (MLflow's defaults, 7 retries with backoff and 120 s per request, hung for minutes).
# Once connected, requests are patient and still bounded (~30 s of retries), so a long training
# run rides out a server restart instead of dying at its next metric batch.
TIMEOUT_ENV = "DYNAFLIP_REGISTRY_TIMEOUT"
DEFAULT_TIMEOUT = 5.0
_RETRIES, _BACKOFF, _TIMEOUT = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)
_PATIENT = {_RETRIES: "4", _BACKOFF: "2", _TIMEOUT: "30"}
_ours: dict[str, str] = {}  # the values this module put in the environment


def _set_http(values: dict[str, str]) -> None:
    """Sets MLflow's HTTP variables to `values`, except those the user set."""
    for key, value in values.items():
        current = os.environ.get(key)
        if current is not None and current != _ours.get(key):
            continue  # the user's
        os.environ[key] = _ours[key] = value


@dataclass(frozen=True)
class VersionInfo:
    """A registered version, JSON-ready."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]
    created: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "source": self.source,
            "run_id": self.run_id,
            "tags": self.tags,
            "aliases": self.aliases,
            "created": self.created,
        }


def registry_timeout() -> float:
    """Seconds one registry request may take (``DYNAFLIP_REGISTRY_TIMEOUT``, default 5).

    Raises:
        InputError: A value that is not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InputError(None, TIMEOUT_ENV, repr(raw), "a positive number of seconds")
    return value


class RunHandle:
    """An active MLflow run: metrics are buffered and logged in batches.

    A batch goes out at 500 metrics or `FLUSH_SECONDS` after the last one, whichever comes
    first, so a long run shows live curves in the tracking UI and a SIGKILL loses at most that
    much (at 500 metrics alone a pretraining run logged nothing for its first ~1,200 steps).
    """

    FLUSH_SECONDS = 30.0

    def __init__(self, client: Any, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self._buffer: list[Any] = []
        self._flushed = time.monotonic()

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        if len(self._buffer) >= 500 or time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self.client.log_batch(self.run_id, metrics=self._buffer)
            self._buffer = []
        self._flushed = time.monotonic()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, data, name)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> str:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        return f"runs:/{self.run_id}/{artifact_path}"

    def artifact_uri(self, artifact_path: str) -> str:
        run = self.client.get_run(self.run_id)
        return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)


class Registry:
    """MLflow tracking + model registry at a resolved `Store`."""

    def __init__(self, store: Store) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        # MLflow prints "View run ... at: URL" on stdout for server stores: stdout is ours
        # (--json output must stay parseable).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        timeout = registry_timeout()
        _set_http({_RETRIES: "1", _BACKOFF: "1", _TIMEOUT: f"{timeout:g}"})
        from filelock import FileLock
        from mlflow import MlflowClient

        # After the import: mlflow configures its logger when imported.
        for name in ("mlflow", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.store = store
        store.home.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(str(store.lock_path), timeout=120)
        try:
            with self.lock:
                self.client = MlflowClient(
                    tracking_uri=store.tracking_uri, registry_uri=store.tracking_uri
                )
                self.client.search_experiments(max_results=1)
        except Exception as exc:
            raise RuntimeFailure(
                f"registry {store.tracking_uri} unreachable: {_short_error(exc)} (check "
                f"--tracking-uri; a slow server: --registry-timeout SECONDS, now {timeout:g})"
            ) from None
        finally:
            _set_http(_PATIENT)

    # ------------------------------------------------------------------------------- runs

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        location = f"{self.store.artifact_root}/{name}" if self.store.artifact_root else None
        with self.lock:
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return str(exp.experiment_id)
            try:
                return str(self.client.create_experiment(name, artifact_location=location))
            except Exception:
                # Another machine on the same server created it first (the lock is local).
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
                return str(exp.experiment_id)

    @contextlib.contextmanager
    def run(
        self, experiment: str, run_name: str, tags: dict[str, str] | None = None
    ) -> Iterator[RunHandle]:
        """A run that ends FINISHED, FAILED (exception) or KILLED (Ctrl-C / SIGTERM)."""
        owner = {"dynaflip.host": socket.gethostname(), "dynaflip.pid": str(os.getpid())}
        run = self.client.create_run(
            self.experiment_id(experiment), run_name=run_name, tags={**(tags or {}), **owner}
        )
        handle = RunHandle(self.client, run.info.run_id)
        try:
            yield handle
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                handle.flush()
                self.client.set_terminated(run.info.run_id, "KILLED")
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                handle.flush()
                self.client.set_terminated(run.info.run_id, "FAILED")
            raise
        handle.flush()
        self.client.set_terminated(run.info.run_id, "FINISHED")

    def reap_dead_runs(self, experiment: str, tags: dict[str, str]) -> list[str]:
        """Marks KILLED the RUNNING runs with these tags whose process is gone.

        A run killed with SIGKILL (or by power loss) cannot end itself; the next run on the same
        work folder (a ``--resume``) reaps it. Only runs started on this host are judged.
        """
        if any("'" in v for v in tags.values()):
            return []
        clauses = ["attributes.status = 'RUNNING'"]
        clauses += [f"tags.`{k}` = '{v}'" for k, v in tags.items()]
        host = socket.gethostname()
        reaped = []
        for r in self.search_runs(experiment, " and ".join(clauses)):
            t = r.data.tags
            if t.get("dynaflip.host") != host or _alive(int(t.get("dynaflip.pid", "0"))):
                continue
            self.client.set_tag(r.info.run_id, "dynaflip.reaped", "process gone")
            self.client.set_terminated(r.info.run_id, "KILLED")
            reaped.append(r.info.run_id)
        return reaped

    # ---------------------------------------------------------------------------- versions

    def _info(self, mv: Any, aliases: dict[str, list[str]] | None = None) -> VersionInfo:
        return VersionInfo(
            name=mv.name,
            version=str(mv.version),
            source=mv.source,
            run_id=mv.run_id,
            tags=dict(mv.tags or {}),
            aliases=(aliases or {}).get(str(mv.version), []),
            created=int(mv.creation_timestamp or 0),
        )

    def _aliases(self, name: str) -> dict[str, list[str]]:
        # search_model_versions returns empty aliases (open bug): read the registered model's.
        out: dict[str, list[str]] = {}
        rm = self._call(f"reading {name}", self.client.get_registered_model, name, missing=None)
        for alias, version in ((rm.aliases if rm is not None else None) or {}).items():
            out.setdefault(str(version), []).append(alias)
        return out

    def _call(self, what: str, fn: Any, *args: Any, missing: Any = _RAISE, **kwargs: Any) -> Any:
        """Calls the MLflow client; a missing resource returns `missing` when given, and any
        other failure is one RuntimeFailure line (exit 3), never an empty answer: a gate that
        read "nothing there" from a failed request would open."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if missing is not _RAISE and _is_missing(exc):
                return missing
            raise RuntimeFailure(
                f"registry {self.store.tracking_uri}: {what} failed: {_short_error(exc)}"
            ) from exc

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of a registered model, newest first (empty when not registered).

        Raises:
            RuntimeFailure: The registry could not be read (never reported as "no versions").
        """
        mvs: list[Any] = []
        token = None
        while True:
            page = self._call(
                f"listing versions of {name}",
                self.client.search_model_versions,
                f"name='{name}'",
                page_token=token,
            )
            mvs += list(page)
            token = getattr(page, "token", None)
            if not token:
                break
        aliases = self._aliases(name)
        return sorted((self._info(m, aliases) for m in mvs), key=lambda v: -int(v.version))

    def search_runs(self, experiment: str, filter_string: str) -> list[Any]:
        """Every run of an experiment matching `filter_string` (all pages; empty when the
        experiment does not exist yet)."""
        exp = self._call(
            f"reading experiment {experiment}", self.client.get_experiment_by_name, experiment
        )
        if exp is None:
            return []
        runs: list[Any] = []
        token = None
        while True:
            page = self._call(
                f"searching runs of {experiment}",
                self.client.search_runs,
                [exp.experiment_id],
                filter_string=filter_string,
                max_results=RUN_PAGE,
                page_token=token,
            )
            runs += list(page)
            token = getattr(page, "token", None)
            if not token:
                return runs

    def resolve(self, name: str, ref: str) -> VersionInfo:
        """A version by number or alias, in any of the spellings the tool prints or MLflow uses:
        ``3``, ``v3``, ``prod-lab``, ``@prod-lab``, ``models:/NAME/3``, ``models:/NAME@prod-lab``.

        Raises:
            InputError: Unknown version or alias (lists what exists), or a ``models:/`` URI of
                another registered model.
        """
        key = parse_ref(name, ref)
        versions = self.versions(name)
        if key.isdigit():
            for v in versions:
                if v.version == key:
                    return v
        else:
            for v in versions:
                if key in v.aliases:
                    return v
        known = [v.version for v in versions] + sorted({a for v in versions for a in v.aliases})
        raise InputError(
            name,
            None,
            f"no version or alias {ref!r}",
            "one of " + (", ".join(known) or "(none registered)"),
        )

    def register(
        self,
        name: str,
        run: RunHandle,
        folder: str | Path,
        artifact_path: str,
        tags: dict[str, str],
        description: str | None = None,
    ) -> VersionInfo:
        """Uploads a bundle folder to the run and registers it as a new version, with its
        manifest's sha256 in the version's tags (`download` checks it: a manifest rewritten on
        the server together with the files it lists is caught too)."""
        tags = {**tags, **_manifest_tags(Path(folder))}
        run.log_artifacts(folder, artifact_path)
        source = run.artifact_uri(artifact_path)
        with self.lock:
            if (
                self._call(f"reading {name}", self.client.get_registered_model, name, missing=None)
                is None
            ):
                description = MODEL_DESCRIPTIONS.get(name) or (
                    "Promotion / rollback requests of one site, in the order the store numbered "
                    "them (dynaflip-adapt `history` replays them)."
                    if name.startswith(EVENTS_PREFIX)
                    else ""
                )
                self.client.create_registered_model(name, description=description)
            mv = self.client.create_model_version(
                name, source, run_id=run.run_id, tags=tags, description=description
            )
        return self._info(mv, self._aliases(name))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        with self.lock:
            self.client.set_registered_model_alias(name, alias, version)

    def download(
        self, version: VersionInfo, kind: str, verify: Callable[[Path], Any] | None = None
    ) -> Path:
        """A local copy of a version's folder, cached per version.

        The copy is made in a temporary folder, checked with `verify` (which raises
        `InputError` on a failed sha256) and only then renamed into place with a ``.complete``
        marker: an interrupted download, or artifacts damaged on the server, are never cached.
        Callers still verify what they load.

        Raises:
            InputError: The artifacts fail `verify`; the message names the version.
            RuntimeFailure: The artifacts are gone or could not be copied.
        """
        import mlflow.artifacts

        # Keyed by the artifacts' location too (it names the MLflow run): two stores used from
        # one home (a server and the embedded store, a benchmark's own registry) both have a
        # "dynaflip-policy v1", and one must never be read as the other.
        where = hashlib.sha256(version.source.encode()).hexdigest()[:12]
        cache = self.store.home / "cache" / kind / f"{version.name}-v{version.version}-{where}"
        if (cache / ".complete").exists():
            return cache
        label = f"{version.name} v{version.version}"
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".dl-"))
        try:
            try:
                got = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=version.source,
                        dst_path=str(tmp),
                        tracking_uri=self.store.tracking_uri,
                    )
                )
            except Exception as exc:  # gone from the store, server down, no room
                # MLflow lists each file's failure after a "##### File NAME #####" banner.
                text = str(exc).rsplit("#####", 1)[-1] if "#####" in str(exc) else ""
                text = " ".join(text.split()) or _short_error(exc)
                raise RuntimeFailure(
                    f"{label}: downloading its artifacts failed ({text}; source {version.source})"
                ) from None
            name = version.tags.get("manifest_file")
            want = version.tags.get("manifest_sha256")
            if name and want and not (got / name).is_file():
                raise InputError(
                    label, name, "missing in the registry's copy", f"a file with {want[:19]}..."
                )
            if name and want and (found := _sha256(got / name)) != want:
                raise InputError(
                    label,
                    name,
                    f"{found[:19]}... in the registry's copy ({version.source}): rewritten "
                    "since registration",
                    f"{want[:19]}... as registered (restore the store's artifacts)",
                )
            if verify is not None:
                try:
                    verify(got)
                except InputError as exc:
                    where = exc.file.replace(str(got), "") if exc.file else ""
                    raise InputError(
                        label,
                        where.lstrip("/\\") or exc.key,
                        f"{exc.found} in the registry's copy ({version.source})",
                        f"{exc.expected} as registered (restore the store's artifacts)",
                    ) from None
            (got / ".complete").write_text(version.source)
            if cache.exists() and not (cache / ".complete").exists():
                shutil.rmtree(cache, ignore_errors=True)  # a leftover of an older layout
            try:
                # Never over a complete copy: another process may be reading it.
                os.rename(got, cache)
            except OSError:
                if not (cache / ".complete").exists():
                    raise
        except OSError as exc:
            raise RuntimeFailure(f"{label}: download failed ({exc})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cache


def parse_ref(name: str, ref: str) -> str:
    """The version number or alias a reference names (see `Registry.resolve`).

    Raises:
        InputError: An empty reference, or a ``models:/`` URI of another registered model.
    """
    text = ref.strip()
    if text.startswith("models:/"):
        body = text[len("models:/") :]
        model, sep, key = body.partition("@") if "@" in body else body.partition("/")
        if model != name or not sep or not key:
            raise InputError(
                None,
                "version",
                repr(ref),
                f"models:/{name}/VERSION or models:/{name}@ALIAS",
            )
        return key
    text = text.removeprefix("@")
    if len(text) > 1 and text[0] in "vV" and text[1:].isdigit():
        text = text[1:]
    if not text:
        raise InputError(None, "version", repr(ref), "a version number or alias")
    return text


def metric_key(*parts: str) -> str:
    """An MLflow metric name from parts: dots between them, no spaces or other characters MLflow
    or its UI handle badly (``"lab-bc (v1)"`` -> ``lab-bc_v1``)."""
    import re

    clean = [re.sub(r"[^A-Za-z0-9_.\-/]+", "_", p.strip()).strip("_") for p in parts]
    return ".".join(c for c in clean if c)


def _is_missing(exc: BaseException) -> bool:
    """An MLflow 'does not exist' answer (the only error that means "nothing there")."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


# The file that lists a registered folder's files with their sha256 (bundles and adapters: the
# manifest; policies: their spec), pinned in the version's tags at registration.
MANIFEST_FILES = ("manifest.json", "policy.json")


def _sha256(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def _manifest_tags(folder: Path) -> dict[str, str]:
    """``manifest_file`` and ``manifest_sha256`` of a folder about to be registered (none for a
    folder without one of `MANIFEST_FILES`)."""
    for name in MANIFEST_FILES:
        if (folder / name).is_file():
            return {"manifest_file": name, "manifest_sha256": _sha256(folder / name)}
    return {}


def _short_error(exc: BaseException) -> str:
    """One line for a client error: the innermost cause, without MLflow's request dump."""
    text = f"{type(exc).__name__}: {exc}"
    for marker in ("Caused by ", "failed with exception "):
        if marker in text:
            text = text.split(marker, 1)[1]
    text = " ".join(text.split())
    return text if len(text) <= 240 else text[:237] + "..."


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
