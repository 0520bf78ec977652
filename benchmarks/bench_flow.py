"""3D-flow extraction throughput (frame pairs/s, 128x128) and accuracy vs ground truth.

Goal: >= 30 pairs/s on 2 cores. Also prints a plain DIS call rate measured in the same run, the
ceiling for this pipeline (two DIS calls per pair with the forward-backward check).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    import cv2

    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.flow.evaluate import evaluate_flow
    from dynaflip_adapt.flow.extract import ExtractConfig, extract_logs
    from dynaflip_adapt.sim.generate import GenerateSpec, generate
    from dynaflip_adapt.sim.sites import get_site

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "logs.h5"
        spec = GenerateSpec(
            get_site("base"), args.episodes, args.frames, 0, args.size, flow_strides=(1,)
        )
        generate(path, spec, workers=2)
        # The ceiling: bare DIS calls on the same frames.
        ep = open_logs(path).episodes[0]
        gray = [
            cv2.cvtColor(f, cv2.COLOR_RGB2GRAY)
            for f in EpisodeReader().rgb(ep, slice(0, ep.length))
        ]
        dis = cv2.DISOpticalFlow.create(2)
        t0 = time.perf_counter()
        for a, b in itertools.pairwise(gray):
            dis.calc(a, b, None)
        dis_rate = (len(gray) - 1) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        reports = extract_logs([path], ExtractConfig())
        dt = time.perf_counter() - t0
        pairs = sum(r.pairs for r in reports)
        ev = evaluate_flow([path])
    rate = pairs / dt
    print(f"bare DIS (medium) calls     : {dis_rate:7.1f} /s")
    size = f"{args.size}x{args.size}"
    print(f"flow extract (fwd+bwd DIS)  : {rate:7.1f} pairs/s over {pairs} pairs, {size}")
    print(f"ratio extract / (DIS / 2)   : {rate / (dis_rate / 2):7.2f}")
    print(f"goal >= 30 pairs/s          : {'PASS' if rate >= 30 else 'FAIL'}")
    print(
        f"accuracy: moving points recovered {ev.found_fraction:.1%}, EPE median "
        f"{ev.epe_median_mm:.2f} mm, p90 {ev.epe_p90_mm:.2f} mm ({ev.moving_points} moving points)"
    )


if __name__ == "__main__":
    main()
