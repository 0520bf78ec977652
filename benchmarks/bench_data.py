"""Streaming data path: throughput vs a plain h5py read, and memory vs file size.

1. Throughput: `FramePairDataset` through a DataLoader with 2 workers, against a plain sequential
   h5py loop that reads the same arrays for every pair (rgb t and t+k, depth both ends, K,
   extrinsics, actions, proprio, flow). Goal: >= 0.5x of the raw read.
2. Peak RSS of a process that streams every pair of a 1x file and of a 10x file (same episode
   shape, 10x the episodes). Goal: ratio <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_file(path: Path, episodes: int, T: int, size: int, points: int) -> None:
    from dynaflip_adapt.data.writer import EpisodeData, NativeWriter

    rng = np.random.default_rng(0)
    K = np.array([[size, 0, (size - 1) / 2], [0, size, (size - 1) / 2], [0, 0, 1.0]])
    with NativeWriter(path) as w:
        for i in range(episodes):
            # Smooth-ish frames so compression-free storage is still realistic in size.
            base = rng.integers(0, 256, (T, size // 8, size // 8, 3), dtype=np.uint8)
            rgb = np.repeat(np.repeat(base, 8, 1), 8, 2)
            extr = np.tile(np.eye(4), (T, 1, 1))
            pts = rng.normal(size=(T - 1, points, 3)).astype(np.float32)
            w.add(
                EpisodeData(
                    rgb={"agentview": rgb},
                    actions=rng.normal(size=(T, 7)).astype(np.float32),
                    language=f"task {i % 5}",
                    depth={"agentview": (1 + rng.random((T, size, size))).astype(np.float32)},
                    intrinsics={"agentview": K},
                    extrinsics={"agentview": extr},
                    proprio={"robot0_eef_pos": rng.normal(size=(T, 3)).astype(np.float32)},
                    flows={
                        "ground_truth": {
                            "points": pts,
                            "delta": pts * 0.01,
                            "valid": np.ones((T - 1, points), bool),
                        }
                    },
                )
            )


def raw_read(path: Path, gap: int) -> int:
    """The hand-rolled baseline: one open file, a loop over pairs, the same arrays."""
    import h5py

    n = 0
    with h5py.File(path, "r") as f:
        for name in sorted(f["data"], key=lambda s: int(s.split("_")[1])):
            g = f["data"][name]
            T = g["actions"].shape[0]
            for t in range(T - gap):
                g["obs/agentview_image"][t]
                g["obs/agentview_image"][t + gap]
                g["obs/agentview_depth"][t]
                g["obs/agentview_depth"][t + gap]
                g["obs/agentview_intrinsics"][()]
                g["obs/agentview_extrinsics"][t]
                g["obs/agentview_extrinsics"][t + gap]
                g["actions"][t]
                g["obs/robot0_eef_pos"][t]
                if gap == 1:
                    g["flow/ground_truth/points"][t]
                    g["flow/ground_truth/delta"][t]
                    g["flow/ground_truth/valid"][t]
                n += 1
    return n


def stream(path: Path, gap: int, workers: int, batch: int = 32) -> int:
    from torch.utils.data import DataLoader

    from dynaflip_adapt.data.dataset import FramePairDataset
    from dynaflip_adapt.data.logs import open_logs

    ds = FramePairDataset(open_logs(path), gap=gap)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True)
    n = 0
    for b in loader:
        n += int(b["rgb0"].shape[0])
    return n


def _rss_child(path: str, gap: int, workers: int) -> None:
    n = stream(Path(path), gap, workers)
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"pairs": n, "rss_kb": self_kb, "worker_rss_kb": child_kb}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--points", type=int, default=256)
    ap.add_argument("--gap", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        _rss_child(args.rss_child[0], int(args.rss_child[1]), int(args.rss_child[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        small, big = Path(tmp) / "x1.h5", Path(tmp) / "x10.h5"
        make_file(small, args.episodes, args.frames, args.size, args.points)
        make_file(big, 10 * args.episodes, args.frames, args.size, args.points)
        mb = small.stat().st_size / 2**20
        print(f"file 1x: {mb:.1f} MiB, 10x: {big.stat().st_size / 2**20:.1f} MiB")

        # Throughput on the 10x file: steady state, as in training (worker start-up amortised).
        raw_read(big, args.gap)  # warm the page cache for both contenders
        t0 = time.perf_counter()
        n_raw = raw_read(big, args.gap)
        t_raw = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_ds = stream(big, args.gap, args.workers)
        t_ds = time.perf_counter() - t0
        assert n_raw == n_ds, (n_raw, n_ds)
        raw_rate, ds_rate = n_raw / t_raw, n_ds / t_ds
        print(f"raw sequential h5py read : {raw_rate:8.0f} pairs/s")
        print(f"FramePairDataset, {args.workers} workers: {ds_rate:8.0f} pairs/s")
        ratio = ds_rate / raw_rate
        verdict = "PASS" if ratio >= 0.5 else "FAIL"
        print(f"throughput ratio         : {ratio:8.2f}  (goal >= 0.5: {verdict})")

        rss = {}
        for name, p in (("1x", small), ("10x", big)):
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(p), str(args.gap), str(args.workers)],
                capture_output=True,
                text=True,
                check=True,
            )
            rss[name] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rss[name]
            print(
                f"peak RSS {name:>3}: main {r['rss_kb'] / 1024:7.1f} MiB, "
                f"largest worker {r['worker_rss_kb'] / 1024:7.1f} MiB ({r['pairs']} pairs)"
            )
        main_ratio = rss["10x"]["rss_kb"] / rss["1x"]["rss_kb"]
        worker_ratio = rss["10x"]["worker_rss_kb"] / max(1, rss["1x"]["worker_rss_kb"])
        ok = main_ratio <= 1.1 and worker_ratio <= 1.1
        print(
            f"RSS ratio 10x/1x        : main {main_ratio:.3f}, worker {worker_ratio:.3f}"
            f"  (goal <= 1.1: {'PASS' if ok else 'FAIL'})"
        )


if __name__ == "__main__":
    main()
