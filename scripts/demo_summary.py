"""The demo's last screen: what the adapter did, offline and in closed loop, read back from the
JSON that `eval logs --out` and `eval rollout --out` wrote.

Usage: demo_summary.py OUT SITE VERSION SECONDS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _pct(x: float, ci: list[float] | None = None) -> str:
    """A change in percent, with its 95% interval when given; coloured when the interval (or,
    without one, the change) excludes 0."""
    x = x + 0.0  # no "-0.0%"
    lo, hi = ci if ci is not None else (x, x)
    colour = "green" if hi < 0 else "red" if lo > 0 else "white"
    band = f" [{100 * lo + 0.0:+.1f}, {100 * hi + 0.0:+.1f}]" if ci is not None else ""
    return f"[{colour}]{100 * x:+.1f}%{band}[/]"


def _rate(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{s['successes']}/{s['episodes']} ({100 * lo:.0f}-{100 * hi:.0f}%)"


def main(out: Path, site: str, version: str, seconds: int) -> None:
    console = Console()
    offline = json.loads((out / "eval_logs.json").read_text())
    loop = json.loads((out / "rollout.json").read_text())
    console.print(
        f"adapter v{version} for site {site}: audit [bold]{offline['audit']}[/]; "
        f"the demo took {seconds / 60:.1f} min"
    )
    t = Table(
        title="offline: action error change with the adapter, held-out episodes [95% interval]"
    )
    t.add_column("policy")
    t.add_column(f"at {site}", justify="right")
    t.add_column("at base (retention)", justify="right")
    for p, r in offline["reduction"].items():
        ci = offline.get("reduction_ci95", {}).get(p)
        base = offline.get("base_change", {}).get(p)
        base_ci = offline.get("base_change_ci95", {}).get(p)
        t.add_row(
            p,
            _pct(0.0 - r, None if ci is None else [-ci[1], -ci[0]]),
            _pct(base, base_ci) if base is not None else "-",
        )
    console.print(t)
    sites = list(dict.fromkeys(c["site"] for c in loop["cells"]))
    encoders = [e for e in dict.fromkeys(c["encoder"] for c in loop["cells"]) if e != "-"]
    cols = [(s, e) for s in sites for e in encoders or ["-"]]
    t = Table(title="closed loop: successes on paired episodes (95% interval)")
    t.add_column("policy")
    for s, e in cols:
        t.add_column(f"{s}\n{e}", justify="right")
    rows: dict[str, dict] = {}
    for c in loop["cells"]:
        name = c.get("head") or c["policy"]
        # A policy that reads no image (encoder "-") is the same under every encoder.
        for e in [c["encoder"]] if c["encoder"] != "-" else encoders or ["-"]:
            rows.setdefault(name, {})[(c["site"], e)] = c["success"]["all"]
    expert = loop.get("expert") or {}
    if expert:
        rows["expert"] = {k: expert[k[0]]["all"] for k in cols if k[0] in expert}
    for policy, cells in rows.items():
        t.add_row(policy, *[_rate(cells[k]) if k in cells else "" for k in cols])
    console.print(t)
    console.print(
        f"sites {', '.join(sites)}; offline: change < 0 is better; "
        "image policies should beat the proprio-only control (docs/results/)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]))
