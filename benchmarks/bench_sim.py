"""Simulator throughput: frames/s written to HDF5 with ground-truth flow, 1 vs 2 workers.

Goal: >= 100 frames/s at 128x128 with GT flow on 2 cores. Prints the ratio of the two runs too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--site", default="base")
    args = ap.parse_args()
    from dynaflip_adapt.sim.generate import GenerateSpec, generate
    from dynaflip_adapt.sim.sites import get_site

    spec = GenerateSpec(get_site(args.site), args.episodes, args.frames, 0, args.size)
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            res = generate(Path(tmp) / f"w{workers}.h5", spec, workers=workers, compression="lzf")
            rates[workers] = res.frames_per_second
            print(
                f"{workers} worker(s): {res.frames} frames in {res.seconds:5.1f} s = "
                f"{res.frames_per_second:6.1f} frames/s (GT flow strides {spec.flow_strides}, "
                f"{args.size}x{args.size}, site {args.site}, expert success {res.success_rate:.0%})"
            )
    print(f"speed-up 2 vs 1 workers : {rates[2] / rates[1]:.2f}")
    print(f"goal >= 100 frames/s    : {'PASS' if rates[2] >= 100 else 'FAIL'}")


if __name__ == "__main__":
    main()
