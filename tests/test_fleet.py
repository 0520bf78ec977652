"""One registry for many machines: an `mlflow server` on a PostgreSQL backend store (started
here on 127.0.0.1), several "machines" (processes with their own DYNAFLIP_HOME, hence their own
file locks) promoting and rolling back one site at once."""

from __future__ import annotations

import glob
import importlib.util
import itertools
import multiprocessing as mp
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.test_server import Server, _free_port

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("flask") is None, reason="needs the server extra (full mlflow)"
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("psycopg2") is None, reason="needs the server extra (psycopg2)"
    ),
    pytest.mark.slow,
]
MACHINES, PROCESSES = 3, 4
# Requests per process; DYNAFLIP_RACE_REQUESTS=17 makes the 200-request run of docs/deploy.md.
REQUESTS = int(os.environ.get("DYNAFLIP_RACE_REQUESTS", "4"))


def _pg(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free localhost port (as user postgres under root:
    the server refuses to run as root)."""
    initdb, pg_ctl = _pg("initdb"), _pg("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="dynaflip-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    root.chmod(0o755)
    port = _free_port()
    subprocess.run([*as_user, initdb, "-D", str(root / "data"), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-o", opts, "-l",
                    str(root / "log"), "-w", "start"], check=True, capture_output=True)  # fmt: skip
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute("CREATE DATABASE mlflow")
    conn.close()
    yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    subprocess.run([*as_user, pg_ctl, "-D", str(root / "data"), "-m", "fast", "stop"],
                   capture_output=True)  # fmt: skip
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, postgres):
    s = Server(tmp_path_factory.mktemp("pg-server"), backend=postgres, workers=2)
    s.start()
    yield s
    s.stop()


def _registry(uri: str, home: Path):
    os.environ["DYNAFLIP_HOME"] = str(home)
    from dynaflip_adapt.registry.client import Registry
    from dynaflip_adapt.registry.store import resolve_store

    return Registry(resolve_store(uri))


def _machine_worker(job: tuple[str, str, int, list[str], str]) -> list[tuple[str, str, str]]:
    """One process of one machine: alternately promote either adapter and roll back."""
    uri, home, proc, versions, site = job
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.registry.lifecycle import RaceLost, promote, rollback

    reg = _registry(uri, Path(home))
    out = []
    for i in range(REQUESTS):
        try:
            if (proc + i) % 3 == 2:
                ev = rollback(reg, site, reason=f"p{proc}")
                out.append(("rollback", "applied", ev["request"]))
            else:
                v = versions[(proc + i) % 2]
                ev = promote(reg, v, site, audit_verdict="compatible", forced=True, reason="race")
                out.append(("promote", "applied", ev["request"]))
        except RaceLost:
            out.append(("promote", "lost", ""))
        except InputError:
            out.append(("rollback", "nothing", ""))
    return out


def _two_adapters(uri: str, tmp_path: Path, site: str) -> tuple[Any, list[str]]:
    """A registry with two (empty) adapter versions, the first promoted at `site`."""
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL
    from dynaflip_adapt.registry.lifecycle import promote

    reg = _registry(uri, tmp_path / "setup")
    versions = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text("{}")
        with reg.run("dynaflip-finetune", name, {}) as run:
            versions.append(reg.register(ADAPTER_MODEL, run, folder, "adapter", {}).version)
    promote(reg, versions[0], site, audit_verdict="compatible", forced=True, reason="seed")
    return reg, versions


def _assert_consistent(reg: Any, site: str, applied: list[int]) -> list[dict]:
    """The site's history after a race: sequence numbers without gap or duplicate, each event's
    previous what the one before set, the alias where the last event put it, and exactly the
    requests the workers were told were applied (none lost, none invented)."""
    from dynaflip_adapt.registry.lifecycle import current, history

    events = history(reg, site)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for before, after in itertools.pairwise(events):
        assert after["previous"] == before["version"], (before, after)
    assert current(reg, site) == events[-1]["version"]
    assert applied == sorted(int(e["request"]) for e in events[1:])
    return events


def test_machines_sharing_a_postgres_backed_server_keep_one_consistent_history(server, tmp_path):
    from dynaflip_adapt.registry.lifecycle import events_model

    reg, versions = _two_adapters(server.uri, tmp_path, "fleet")
    jobs = [(server.uri, str(tmp_path / f"machine{m}"), m * PROCESSES + p, versions, "fleet")
            for m in range(MACHINES) for p in range(PROCESSES)]  # fmt: skip
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = [r for w in pool.map(_machine_worker, jobs) for r in w]
    assert len(results) == MACHINES * PROCESSES * REQUESTS

    applied = sorted(int(r[2]) for r in results if r[1] == "applied")
    _assert_consistent(reg, "fleet", applied)
    # Every request is in the store's log, numbered 1..n without a gap, applied or not.
    requests = sorted(int(v.version) for v in reg.versions(events_model("fleet")))
    lost = [r for r in results if r[1] == "lost"]
    assert requests == list(range(1, len(requests) + 1))
    assert len(requests) >= 1 + len(applied) + len(lost)
    print(f"{len(results)} requests from {MACHINES} machines x {PROCESSES} processes: "
          f"{len(applied)} applied, {len(lost)} promotions lost a race")  # fmt: skip


# Seconds each load-test process runs: 20 in CI; DYNAFLIP_LOAD_SECONDS=600 makes the 8 x 10 min
# run whose numbers are in docs/deploy.md (DYNAFLIP_LOAD_REPORT=FILE writes them as JSON).
LOAD_SECONDS = float(os.environ.get("DYNAFLIP_LOAD_SECONDS", "20"))
LOAD_PROCESSES = 8
# Mixed traffic: three reads for each write, as a fleet of dashboards and cron jobs would do.
LOAD_MIX = ["list", "show", "history"] * 3 + ["promote", "rollback", "register"]


def _load_worker(job: tuple[str, str, int, list[str], str, float]) -> list[tuple[str, float, str]]:
    """One process: random commands until `seconds` have passed; (command, seconds, outcome)."""
    import random
    import time

    uri, home, proc, versions, site, seconds = job
    from dynaflip_adapt.errors import InputError
    from dynaflip_adapt.registry.adapters import ADAPTER_MODEL
    from dynaflip_adapt.registry.lifecycle import POLICY_MODEL, RaceLost, history, promote, rollback

    reg = _registry(uri, Path(home))
    rng = random.Random(proc)
    policy = Path(home) / "policy"
    policy.mkdir(parents=True, exist_ok=True)
    (policy / "spec.json").write_text("{}")
    out: list[tuple[str, float, str]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        op = rng.choice(LOAD_MIX)
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            if op == "list":
                reg.versions(ADAPTER_MODEL)
            elif op == "show":
                reg.resolve(ADAPTER_MODEL, rng.choice(versions))
            elif op == "history":
                history(reg, site)
            elif op == "promote":
                ev = promote(reg, rng.choice(versions), site, audit_verdict="compatible",
                             forced=True, reason="load")  # fmt: skip
                outcome = "applied:" + ev["request"]
            elif op == "rollback":
                outcome = "applied:" + rollback(reg, site, reason="load")["request"]
            else:
                with reg.run("dynaflip-policies", f"load-{proc}", {}) as run:
                    reg.register(POLICY_MODEL, run, policy, "policy", {"site": "load-only"})
        except RaceLost:
            outcome = "lost"
        except InputError:
            outcome = "nothing"  # a rollback with nothing to roll back to
        except Exception as exc:  # an error is what this test counts
            outcome = f"error: {type(exc).__name__}: {exc}"
        out.append((op, time.perf_counter() - t0, outcome))
    return out


def test_load_mixed_reads_and_writes_from_8_processes(server, tmp_path):
    """8 processes of mixed traffic against the PostgreSQL-backed server, stopping by
    themselves: no errors, no lost events, latency per command reported."""
    import json
    import statistics

    reg, versions = _two_adapters(server.uri, tmp_path, "load")
    jobs = [(server.uri, str(tmp_path / f"p{p}"), p, versions, "load", LOAD_SECONDS)
            for p in range(LOAD_PROCESSES)]  # fmt: skip
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        results = [r for w in pool.map(_load_worker, jobs) for r in w]

    assert {o for o, _, _ in results} & {"promote", "rollback"}, "no write was exercised"
    errors = [r for r in results if r[2].startswith("error")]
    assert not errors, errors[:3]
    applied = sorted(int(r[2].split(":")[1]) for r in results if r[2].startswith("applied"))
    events = _assert_consistent(reg, "load", applied)

    report: dict[str, dict[str, float]] = {}
    for op in sorted(set(LOAD_MIX)):
        times = sorted(t for o, t, _ in results if o == op)
        if not times:  # a short run on a busy machine may not draw every command
            continue
        report[op] = {
            "n": len(times),
            "p50_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
        }
    summary = {"processes": LOAD_PROCESSES, "seconds": LOAD_SECONDS, "requests": len(results),
               "errors": len(errors), "events": len(events),
               "lost_races": sum(r[2] == "lost" for r in results), "commands": report}  # fmt: skip
    if out := os.environ.get("DYNAFLIP_LOAD_REPORT"):
        Path(out).write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
