"""CLI start-up: `dynaflip-adapt --help` wall time, median of several runs.

Also prints `python -c pass` in the same run as the floor, so the ratio says how much the CLI
itself costs on this (possibly busy) machine. Goal: median < 0.3 s.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


def _time(cmd: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    args = ap.parse_args()
    exe = shutil.which("dynaflip-adapt")
    cli = [exe, "--help"] if exe else [sys.executable, "-m", "dynaflip_adapt", "--help"]
    floor = statistics.median(_time([sys.executable, "-c", "pass"], args.runs))
    help_ = statistics.median(_time(cli, args.runs))
    print(f"python -c pass        : {floor * 1000:7.1f} ms (median of {args.runs})")
    print(f"dynaflip-adapt --help : {help_ * 1000:7.1f} ms (median of {args.runs})")
    print(f"ratio help / python   : {help_ / floor:7.2f}")
    verdict = "PASS" if help_ < 0.3 else "FAIL"
    print(f"goal < 300 ms         : {verdict}")


if __name__ == "__main__":
    main()
