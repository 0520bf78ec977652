"""Can a policy read object positions from the frames? A probe on simulator logs.

Trains the reference CNN (`PixelHead`: conv, spatial softmax, MLP; random shift) from pixels and
proprio to (a) the table xy of every object and the plate in a fixed order (no instruction
needed) and (b) the instructed object's xy given its colour as a one-hot, and prints the RMSE in
cm on held-out episodes beside the spread of each target. Positions come from the logs'
`obs/object_state` (simulator logs only). If (b) is far worse than (a) for the same object, the
bottleneck is combining the instruction with the image, not seeing the objects.

    python benchmarks/probe_object_positions.py TRAIN.h5 TEST.h5 [--steps 1500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COLOURS = ("red", "green", "blue")  # the simulator's objects, in `OBJECTS` order


def load(path: str, size: int):  # type: ignore[no-untyped-def]
    import torch

    from dynaflip_adapt.data.logs import EpisodeReader, open_logs
    from dynaflip_adapt.policies import collect

    logs = open_logs([path])
    d = collect(logs, EpisodeReader(), size, state=True)
    st = d["state"]  # oracle features: target xyz, plate xy, the other two objects' xyz, ...
    named = [next(i for i, c in enumerate(COLOURS) if c in ep.language) for ep in logs.episodes]
    target = torch.tensor(named)[d["episode"]]
    objects = torch.zeros(len(st), 3, 2)
    for k in range(3):
        m = target == k
        rest = [j for j in range(3) if j != k]  # object_state keeps the others in index order
        objects[m, k] = st[m, 0:2]
        objects[m, rest[0]] = st[m, 5:7]
        objects[m, rest[1]] = st[m, 8:10]
    every = torch.cat([objects.reshape(len(st), 6), st[:, 3:5]], 1) * 100  # cm
    onehot = torch.nn.functional.one_hot(target, 3).float()
    return d, every, st[:, 0:2] * 100, onehot


def fit(train, test, y_tr, y_te, c_tr, c_te, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    import torch

    from dynaflip_adapt.policies.heads import PixelHead, random_shift

    torch.manual_seed(0)
    mu, sd = y_tr.mean(0), y_tr.std(0)
    head = PixelHead(c_tr.shape[1], y_tr.shape[1])
    opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y_tr), (64,), generator=g)
        x = random_shift(train["rgb"][idx], 4 * train["rgb"].shape[-1] // 64, g)
        loss = ((head(x, c_tr[idx]) - (y_tr[idx] - mu) / sd) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    head.eval()
    with torch.no_grad():
        pred = torch.cat(
            [head(test["rgb"][i : i + 256], c_te[i : i + 256]) for i in range(0, len(y_te), 256)]
        )
    return [round(float(v), 2) for v in ((pred * sd + mu - y_te) ** 2).mean(0).sqrt()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("train")
    ap.add_argument("test")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    tr, every_tr, tgt_tr, oh_tr = load(args.train, args.size)
    te, every_te, tgt_te, oh_te = load(args.test, args.size)
    pm, ps = tr["proprio"].mean(0), tr["proprio"].std(0) + 1e-6
    p_tr, p_te = (tr["proprio"] - pm) / ps, (te["proprio"] - pm) / ps
    names = [f"{c} {a}" for c in (*COLOURS, "plate") for a in "xy"]
    rmse = fit(tr, te, every_tr, every_te, p_tr, p_te, args.steps)
    spread = [round(float(v), 2) for v in every_te.std(0)]
    print(
        "every object, fixed order: RMSE cm", dict(zip(names, rmse, strict=True)), "spread", spread
    )
    rmse = fit(
        tr, te, tgt_tr, tgt_te, torch.cat([p_tr, oh_tr], 1), torch.cat([p_te, oh_te], 1), args.steps
    )
    spread = [round(float(v), 2) for v in tgt_te.std(0)]
    print("the instructed object | one-hot colour: RMSE cm x/y", rmse, "spread", spread)


if __name__ == "__main__":
    main()
