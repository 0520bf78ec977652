"""The promotion log's replay (`lifecycle._replay`): a pure function of the requests in the order
the store numbered them, so every machine derives the same history."""

from __future__ import annotations

from types import SimpleNamespace

from dynaflip_adapt.registry.lifecycle import APPLIED, LOST, NOTHING, _replay


def request(n: int, action: str, version: str, expects: str) -> SimpleNamespace:
    tags = {"site": "lab", "action": action, "version": version, "expects": expects}
    return SimpleNamespace(version=str(n), run_id=f"r{n}", tags=tags)


def legacy(seq: int, action: str, version: str, previous: str) -> dict:
    return {"seq": seq, "time": float(seq), "action": action, "version": version,
            "previous": previous or None}  # fmt: skip


def test_requests_apply_only_over_what_they_expected_and_number_the_events():
    old = [legacy(1, "promote", "1", ""), legacy(2, "promote", "2", "1")]
    reqs = [
        request(1, "promote", "3", "2"),  # applies: production was 2
        request(2, "promote", "4", "2"),  # lost: production is 3 by now
        request(3, "rollback", "", "3"),  # back to 2
        request(4, "rollback", "1", "2"),  # --to 1
        request(5, "rollback", "", "1"),  # nothing below 1
        request(6, "rollback", "5", "1"),  # --to a version never promoted here
        request(7, "promote", "4", "1"),  # the lost promotion, re-run
    ]
    events, outcome = _replay(old, reqs)
    assert {k: v[0] for k, v in outcome.items()} == {
        "1": APPLIED, "2": LOST, "3": APPLIED, "4": APPLIED, "5": NOTHING, "6": NOTHING,
        "7": APPLIED,
    }  # fmt: skip
    assert outcome["2"][1] == "3"  # what production pointed at when the loser came in
    got = [(e["seq"], e["action"], e["version"], e["previous"]) for e in events]
    assert got == [
        (1, "promote", "1", None),
        (2, "promote", "2", "1"),
        (3, "promote", "3", "2"),
        (4, "rollback", "2", "3"),
        (5, "rollback", "1", "2"),
        (6, "promote", "4", "1"),
    ]
    assert [e.get("request") for e in events[2:]] == ["1", "3", "4", "7"]


def test_the_first_request_of_a_new_site_expects_nothing():
    events, outcome = _replay([], [request(1, "promote", "7", ""), request(2, "promote", "8", "")])
    assert [e["version"] for e in events] == ["7"] and outcome["2"][0] == LOST
