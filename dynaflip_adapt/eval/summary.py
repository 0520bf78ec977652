"""The out-of-distribution benchmark's summary (mean and spread over presets and seeds, the
reductions against no adaptation, the goal check, closed-loop success) and its plot."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaflip_adapt.policies import IMAGE_HEADS

GOAL_REDUCTION = 0.225  # the paper's +22.5% out of distribution
GOAL_BASE_INCREASE = 0.03


def _mean_sd(xs: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(xs) if xs else math.nan,
        "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
        "n": len(xs),
    }


def summarize(rows: list[dict[str, Any]], heads: Sequence[str]) -> dict[str, Any]:
    """Mean and spread over (preset, seed) of each ablation's numbers, reductions relative to
    `none` on the same (preset, seed), and the goal check.

    Per head: shifted-site MSE, its relative reduction vs no adaptation, base-site MSE and its
    relative change (retention). `image_heads` averages the heads that read the image. The
    proprio-only head reads no image: its error is the bar an image head must clear for the
    image to help at all. The audit counts as passed when promotion would accept it
    (compatible, or compatible with warnings).
    """
    none = {(r["preset"], r["seed"]): r for r in rows if r["ablation"] == "none"}
    image_heads = [h for h in heads if h in IMAGE_HEADS]
    out: dict[str, Any] = {}
    for ab in dict.fromkeys(r["ablation"] for r in rows):
        mine = [r for r in rows if r["ablation"] == ab and (r["preset"], r["seed"]) in none]
        s: dict[str, Any] = {"heads": {}}
        red_img: list[float] = []
        base_img: list[float] = []
        for h in heads:
            shift = [r["shifted"][h]["mse"] for r in mine]
            red = [
                1 - r["shifted"][h]["mse"] / none[(r["preset"], r["seed"])]["shifted"][h]["mse"]
                for r in mine
            ]
            base = [r["base"][h]["mse"] for r in mine]
            dbase = [
                r["base"][h]["mse"] / none[(r["preset"], r["seed"])]["base"][h]["mse"] - 1
                for r in mine
            ]
            s["heads"][h] = {
                "shifted_mse": _mean_sd(shift),
                "reduction": _mean_sd(red),
                "base_mse": _mean_sd(base),
                "base_change": _mean_sd(dbase),
            }
            if h in image_heads:
                red_img.append(s["heads"][h]["reduction"]["mean"])
                base_img.append(s["heads"][h]["base_change"]["mean"])
        drift = [r["paired_drift"] for r in mine if r["paired_drift"] is not None]
        verdicts = [r["audit"] for r in mine]
        s["paired_drift"] = _mean_sd(drift)
        s["strength"] = _mean_sd([r["strength"] for r in mine if r.get("strength") is not None])
        s["audit_compatible"] = sum(v == "compatible" for v in verdicts)
        s["audit_warning"] = sum(v == "warning" for v in verdicts)
        # The promotion gate: warnings (changes at the new site, where the old features are the
        # degraded ones) are reported but do not block; only hard failures do.
        s["audit_passed"] = s["audit_compatible"] + s["audit_warning"]
        s["audit_runs"] = len(verdicts)
        s["image_heads_reduction"] = statistics.fmean(red_img) if red_img else math.nan
        s["image_heads_base_change"] = statistics.fmean(base_img) if base_img else math.nan
        if "proprio_only" in heads:
            bar = s["heads"]["proprio_only"]["shifted_mse"]["mean"]
            s["image_heads_beating_proprio_only"] = [
                h for h in image_heads if s["heads"][h]["shifted_mse"]["mean"] < bar
            ]
        s["goal_met"] = bool(
            s["image_heads_reduction"] >= GOAL_REDUCTION
            and s["image_heads_base_change"] <= GOAL_BASE_INCREASE
            and s["audit_passed"] == s["audit_runs"]
        )
        if all(r.get("closed_loop") for r in mine) and mine:
            s["closed_loop"] = _closed_loop_summary(mine, none, heads)
        out[ab] = s
    return out


def _closed_loop_summary(
    mine: list[dict[str, Any]], none: dict[tuple[str, int], dict[str, Any]], heads: Sequence[str]
) -> dict[str, Any]:
    """Success rates (mean and sd over presets and seeds) at the shifted and the base site per
    head, their change against no adaptation on the same (preset, seed), and the goal: the
    image heads' shifted-site success up by GOAL_REDUCTION relative, base-site success within
    the no-adaptation run's 95% interval."""
    out: dict[str, Any] = {"heads": {}}
    gains: list[float] = []
    kept: list[bool] = []
    for h in heads:
        shifted, base, gain, rel = [], [], [], []
        for r in mine:
            ref = none[(r["preset"], r["seed"])]["closed_loop"]
            sh, rs = r["closed_loop"][r["preset"]][h]["all"], ref[r["preset"]][h]["all"]
            b, rb = r["closed_loop"]["base"][h]["all"], ref["base"][h]["all"]
            shifted.append(sh["rate"])
            base.append(b["rate"])
            gain.append(sh["rate"] - rs["rate"])
            if rs["rate"] > 0:
                rel.append(sh["rate"] / rs["rate"] - 1)
            if h in IMAGE_HEADS:
                kept.append(rb["ci95"][0] <= b["rate"] <= rb["ci95"][1] or b["rate"] >= rb["rate"])
        out["heads"][h] = {
            "shifted_success": _mean_sd(shifted),
            "base_success": _mean_sd(base),
            "success_gain": _mean_sd(gain),
            "relative_gain": _mean_sd(rel) if rel else None,
        }
        if h in IMAGE_HEADS and rel:
            gains.append(statistics.fmean(rel))
    ref_rows = [none[(r["preset"], r["seed"])]["closed_loop"] for r in mine]
    out["expert"] = {
        "shifted_success": _mean_sd([x[r["preset"]]["expert"]["all"]["rate"]
                                     for x, r in zip(ref_rows, mine, strict=True)]),
        "base_success": _mean_sd([x["base"]["expert"]["all"]["rate"] for x in ref_rows]),
    }  # fmt: skip
    out["image_heads_relative_gain"] = statistics.fmean(gains) if gains else math.nan
    out["image_heads_base_kept"] = all(kept)
    out["goal_met"] = bool(gains and out["image_heads_relative_gain"] >= GOAL_REDUCTION
                           and all(kept))  # fmt: skip
    return out


def plot(result: dict[str, Any], path: str | Path) -> Path | None:
    """A PNG of shifted-site and base-site error per ablation and head (None without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    summary = result["summary"]
    heads = result["config"]["heads"]
    abls = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(abls), 4), sharey=False)
    width = 0.8 / max(len(heads), 1)
    for ax, key, title in (
        (axes[0], "shifted_mse", "shifted site (held out)"),
        (axes[1], "base_mse", "base site (retention)"),
    ):
        for i, h in enumerate(heads):
            m = [summary[a]["heads"][h][key]["mean"] for a in abls]
            e = [summary[a]["heads"][h][key]["sd"] for a in abls]
            # Log scale (errors span orders of magnitude): clip the lower bar above zero.
            lo = [min(sd, 0.9 * mu) for mu, sd in zip(m, e, strict=True)]
            xs = [j + i * width for j in range(len(abls))]
            ax.bar(xs, m, width, yerr=[lo, e], label=h, capsize=2)
        ax.set_xticks([j + width * (len(heads) - 1) / 2 for j in range(len(abls))])
        ax.set_xticklabels(abls, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel("action MSE (action-std units)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
