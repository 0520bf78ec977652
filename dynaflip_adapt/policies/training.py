"""Training reference heads on site logs: collecting inputs, one fit loop for every head, and a
held-out split of episodes to stop on (heads fitted to a few dozen episodes overfit: measured,
the train loss kept falling while held-out error rose after a few hundred steps)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.models.backbone import Preprocess
from dynaflip_adapt.policies.heads import (
    ESTIMATE_COLUMNS,
    ESTIMATE_UNIT,
    HORIZON,
    DiffusionHead,
    ObjectHead,
    random_shift,
)
from dynaflip_adapt.policies.policy import (
    FRAME_HEADS,
    HEAD_KINDS,
    Policy,
    build_head,
    decode_actions,
    head_inputs,
    policy_spec,
)

Embedder = Callable[[Sequence[str]], torch.Tensor]
SHIFT_PAD = 4  # random-shift augmentation of the pixel head, in pixels at 64 px
# Weight of an object head's estimate loss (decimetres squared) against its action loss
# (action-std units squared): 1.5 cm of estimate error weighs as 0.22 of action MSE.
ESTIMATE_WEIGHT = 10.0

if TYPE_CHECKING:
    from dynaflip_adapt.data.logs import Episode, EpisodeReader, LogSet
    from dynaflip_adapt.models.backbone import Bundle


@torch.no_grad()
def encode_frames(
    encoder: nn.Module,
    preprocess: Preprocess,
    rgb: torch.Tensor,
    batch: int = 128,
    view: str = "features",
) -> torch.Tensor:
    """What a frozen encoder gives uint8 frames (N, 3, H, W): pooled features (N, F), or with
    ``view="tokens"`` its patch tokens (N, P, D)."""
    out = []
    for i in range(0, len(rgb), batch):
        x = preprocess(rgb[i : i + batch])
        out.append(_tokens(encoder, x)[:, 1:] if view == "tokens" else encoder(x))
    return torch.cat(out) if out else torch.zeros(0)


def actions_on_frames(
    policy: Policy,
    encoder: nn.Module,
    preprocess: Preprocess,
    frames: torch.Tensor,
    proprio: torch.Tensor | None = None,
    language: torch.Tensor | None = None,
) -> torch.Tensor:
    """A policy's actions (N, A) on uint8 frames seen through `encoder`. Without `proprio`, the
    proprio and the instruction are held at the policy's mean (the audit's site probe; what
    `monitor` compares), so only the images move the actions."""
    if proprio is None:
        st = policy.stats
        proprio = st["prop_mean"].expand(len(frames), -1)
        language = st["lang_mean"].expand(len(frames), -1) if "lang_mean" in st else None
    view = policy.reads if policy.uses_image else "features"
    return policy.act(encode_frames(encoder, preprocess, frames, view=view), proprio, language)


def _tokens(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 1 + P, D) tokens of a ViT encoder (plain, merged or PEFT-wrapped)."""
    fn = getattr(encoder, "tokens", None)
    if not callable(fn):
        raise ValueError(f"{type(encoder).__name__} has no patch tokens (a ViT has)")
    out: torch.Tensor = fn(x)
    return out


def instruction_embedder(bundle: Bundle) -> Embedder:
    """Instructions -> the backbone's unit language embeddings (B, embed_dim): its frozen
    sentence encoder and projection, which adaptation never changes."""
    from dynaflip_adapt.models.text import embed_instructions

    @torch.no_grad()
    def embed(texts: Sequence[str]) -> torch.Tensor:
        table = embed_instructions(bundle.model.cfg.text_encoder, texts)
        rows = torch.from_numpy(np.stack([table[t] for t in texts])).float()
        return bundle.model.embed_text(rows)

    return embed


def oracle_features(state: torch.Tensor, eef: torch.Tensor) -> torch.Tensor:
    """The oracle head's input from the logged object state (N, 11: target object, plate,
    other objects) and the grasp point (N, 3): the state itself and the same positions relative
    to the grasp point and the target to the plate (N, 24). The same information, in the frame
    the expert acts in: an MLP fed raw positions had to learn the differences and did not (pick
    and place 8/30 vs 24/30 in closed loop, measured)."""
    target, plate, others = state[:, :3], state[:, 3:5], state[:, 5:].reshape(len(state), -1, 3)
    rel = [
        target - eef,
        plate - eef[:, :2],
        (others - eef[:, None]).flatten(1),
        target[:, :2] - plate,
    ]
    return torch.cat([state, *rel], dim=1)


def collect(
    logs: LogSet,
    reader: EpisodeReader,
    image_size: int,
    max_frames: int | None = None,
    language: Embedder | None = None,
    state: bool = False,
    objects: bool = False,
) -> dict[str, torch.Tensor]:
    """Frames (at input size), proprio and actions of every episode, with episode ids; with
    `language`, also each frame's instruction embedding (every episode needs an instruction);
    with `state`, the oracle's input (`oracle_features`; simulator logs only); with `objects`
    (and `state`), which object the instruction names (`target_index`: its place in the
    simulator's object order, from the episode attribute ``target_object``).

    Raises:
        InputError: `language` given and an episode has no instruction, `state` and an
            episode has no object state, `objects` and an episode does not name its object.
    """
    from dynaflip_adapt.data.frames import resize_uint8

    if language is not None:
        for ep in logs.episodes:
            if not ep.language:
                raise InputError(
                    ep.file,
                    f"{ep.group} language",
                    "no instruction",
                    "an instruction for every episode (the policy is language-conditioned; "
                    "train with --no-language otherwise)",
                )
    rgb, prop, act, epi, st, which = [], [], [], [], [], []
    for i, ep in enumerate(logs.episodes):
        frames = torch.from_numpy(
            np.ascontiguousarray(reader.rgb(ep, slice(0, ep.length)).transpose(0, 3, 1, 2))
        )
        rgb.append(resize_uint8(frames, image_size))
        prop.append(torch.from_numpy(np.stack([reader.proprio(ep, t) for t in range(ep.length)])))
        act.append(torch.from_numpy(reader.actions(ep, slice(0, ep.length))))
        epi.append(torch.full((ep.length,), i))
        if state:
            eef = reader.dataset(ep.file, f"{ep.group}/obs/robot0_eef_pos")[()]
            st.append(
                oracle_features(
                    torch.from_numpy(reader.object_state(ep, slice(0, ep.length))),
                    torch.from_numpy(np.asarray(eef, np.float32)),
                )
            )
        if state and objects:
            which.append(torch.full((ep.length,), _target_index(reader, ep)))
    out = {
        "rgb": torch.cat(rgb),
        "proprio": torch.cat(prop),
        "actions": torch.cat(act),
        "episode": torch.cat(epi),
    }
    if state:
        out["state"] = torch.cat(st)
    if state and objects:
        out["target_index"] = torch.cat(which)
    if language is not None:
        texts = [str(ep.language) for ep in logs.episodes]
        out["language"] = language(texts)[out["episode"]]
    if max_frames is not None and len(out["rgb"]) > max_frames:
        sel = torch.linspace(0, len(out["rgb"]) - 1, max_frames).round().long()
        out = {k: v[sel] for k, v in out.items()}
    return out


def _target_index(reader: EpisodeReader, ep: Episode) -> int:
    """Where the episode's instructed object sits in the simulator's object order (what tells
    the objects in ``obs/object_state`` apart: the instructed one first, the others in order)."""
    from dynaflip_adapt.data.schema import SIM_OBJECTS

    names = list(SIM_OBJECTS)
    found = reader.file(ep.file)[ep.group].attrs.get("target_object")
    found = found.decode() if isinstance(found, bytes) else found
    if found not in names:
        raise InputError(
            ep.file,
            f"{ep.group} attribute target_object",
            "missing" if found is None else repr(found),
            "the instructed object's name, one of "
            + ", ".join(names)
            + " (`sim generate` writes it; object heads need it to tell the objects apart)",
        )
    return names.index(str(found))


def action_chunks(actions: torch.Tensor, episode: torch.Tensor, horizon: int) -> torch.Tensor:
    """(N, horizon, A): actions t .. t + horizon - 1 of each frame's episode, the episode's last
    action repeated past its end (frames must be in episode order)."""
    n = len(actions)
    idx = torch.arange(n)[:, None] + torch.arange(horizon)[None]
    idx = idx.clamp(max=n - 1)
    # Past the episode's end: hold its last frame.
    last = torch.zeros(n, dtype=torch.long)
    for e in episode.unique():
        rows = (episode == e).nonzero().flatten()
        last[rows] = rows.max()
    idx = torch.minimum(idx, last[:, None])
    return actions[idx]


def validation_split(episode: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """A boolean mask of the frames of held-out episodes (`fraction` of the episodes, at least
    one; none when `fraction` is 0 or there are fewer than 5 episodes)."""
    ids = episode.unique()
    if fraction <= 0 or len(ids) < 5:
        return torch.zeros(len(episode), dtype=torch.bool)
    k = max(1, round(fraction * len(ids)))
    g = torch.Generator().manual_seed(seed + 7919)
    held = ids[torch.randperm(len(ids), generator=g)[:k]]
    return torch.isin(episode, held)


def binary_dims(actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask, low, high) of the action dimensions that take exactly two values (a gripper's
    open/close): those are classified, not regressed."""
    A = actions.shape[1]
    mask, lo, hi = torch.zeros(A), torch.zeros(A), torch.zeros(A)
    for d in range(A):
        vals = actions[:, d].unique()
        if len(vals) == 2:
            mask[d], lo[d], hi[d] = 1.0, vals[0], vals[1]
    return mask, lo, hi


def _floored_std(x: torch.Tensor, dims: tuple[int, ...] = (0,)) -> torch.Tensor:
    # A floor on the per-dimension std: z-scoring a nearly constant feature would turn a tiny
    # drift into a large input change, making the policy (and its audit) hypersensitive.
    std = x.std(dim=dims)
    return torch.maximum(std, 0.1 * std.median()) + 1e-6


@dataclass
class HeadFit:
    """A fitted head: the module (its best held-out weights), its stats, the last training
    loss and how it was stopped."""

    model: nn.Module
    stats: dict[str, torch.Tensor]
    loss: float
    info: dict[str, Any] = field(default_factory=dict)


def input_stats(
    inputs: torch.Tensor, proprio: torch.Tensor, actions: torch.Tensor, reads: str
) -> dict[str, torch.Tensor]:
    """Normalization statistics of a head's inputs and actions."""
    eps = 1e-6
    stats = {
        "prop_mean": proprio.mean(0),
        "prop_std": proprio.std(0) + eps,
        "act_mean": actions.mean(0),
        "act_std": actions.std(0) + eps,
    }
    if reads in ("features", "state"):
        stats |= {"feat_mean": inputs.mean(0), "feat_std": _floored_std(inputs)}
    elif reads == "tokens":  # per channel, over frames and positions
        stats |= {"feat_mean": inputs.mean((0, 1)), "feat_std": _floored_std(inputs, (0, 1))}
    return stats


def fit_head(
    inputs: torch.Tensor,
    proprio: torch.Tensor,
    actions: torch.Tensor,
    *,
    head: str = "bc",
    steps: int | None = None,
    lr: float = 1e-3,
    batch: int | None = None,
    hidden: int | None = None,
    layers: int | None = None,
    seed: int = 0,
    feature_noise: float = 0.1,
    weight_decay: float = 1e-2,
    episode: torch.Tensor | None = None,
    horizon: int = HORIZON,
    language: torch.Tensor | None = None,
    val_fraction: float = 0.0,
    state: torch.Tensor | None = None,
    target_index: torch.Tensor | None = None,
    on_step: Callable[[int, float], None] | None = None,
    views: Sequence[torch.Tensor] = (),
) -> HeadFit:
    """Fits a head on normalized inputs and actions.

    Gaussian noise on z-scored image features during training (and weight decay) keeps the
    head smooth: an unregularised head fitted to a few hundred frames turned a 5% feature
    change into a 0.9-std action change, failing every audit whatever the adapter. Pixel heads
    get random-shift augmentation instead. With `val_fraction` > 0 a share of the episodes is
    held out: the weights with the lowest held-out action error are kept, and training stops
    when that error has not improved for a quarter of the steps.

    Args:
        inputs: What the head reads (see `Policy.act`).
        proprio: (N, P).
        actions: (N, A) in the logs' units.
        head: A `HEAD_KINDS` name.
        steps: Optimizer steps (default: the head's).
        episode: Frame -> episode id, frames in order (needed by the diffusion head and the
            held-out split).
        language: Instruction embeddings (N, L) to condition on.
        val_fraction: Share of episodes held out to stop on.
        state: The oracle's input (`oracle_features`, N x 24): what an object head's estimate
            is held to (required by heads that need the state).
        target_index: (N,) which object the instruction names, in the simulator's order
            (`collect(objects=True)`; required with `state`).
        on_step: Called with (step, loss) after every optimizer step.
        views: Other inputs of the same frames (each shaped as `inputs`, e.g. the frames
            relit: `appearance_views`); each training sample reads the clean input or one of
            them, drawn uniformly. Statistics and the held-out error use the clean input.
    """
    kind = HEAD_KINDS[head]
    steps = steps or kind.steps
    reads = kind.reads
    torch.manual_seed(seed)
    stats = input_stats(inputs, proprio, actions, reads)
    if language is not None:
        stats |= {"lang_mean": language.mean(0), "lang_std": _floored_std(language)}
    target_est: torch.Tensor | None = None
    if kind.needs_state:
        if state is None or target_index is None:
            raise ValueError(
                f"head {head} needs the logged object state and which object each episode "
                "names (collect(state=True, objects=True))"
            )
        target_est = state[:, list(ESTIMATE_COLUMNS)] * ESTIMATE_UNIT
    if kind.network != "diffusion":
        mask, lo, hi = binary_dims(actions)
        if mask.any():
            stats |= {"bin_mask": mask, "bin_lo": lo, "bin_hi": hi}
    y = normalized_targets(stats, actions)[0]
    f, p = head_inputs(stats, inputs, proprio, language, reads, kind.proprio)
    seen = [head_inputs(stats, v, proprio, None, reads, False)[0] for v in views]
    if kind.network == "diffusion":
        if episode is None:
            raise ValueError("the diffusion head needs the frames' episode ids")
        y = action_chunks(y, episode, horizon)
    held = (
        validation_split(episode, val_fraction, seed)
        if episode is not None
        else torch.zeros(len(y), dtype=torch.bool)
    )
    train = (~held).nonzero().flatten()
    spec = {"head": head, "action_dim": actions.shape[1], "hidden": hidden or kind.hidden}
    spec["layers"] = layers or kind.layers
    if kind.network == "diffusion":
        spec["diffusion"] = {"horizon": horizon, "train_steps": 100, "sample_steps": 10}
    if language is not None:
        spec |= {"inputs": {"language": True}, "language_dim": language.shape[1]}
    in_dim = 0 if reads in ("pixels", "none") else f.shape[-1]
    model = build_head(spec, in_dim, p.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    bsz = batch or (64 if reads == "pixels" else 256)
    bin_mask = stats.get("bin_mask", torch.zeros(y.shape[-1])).bool()
    every = max(1, steps // 25)
    best: tuple[float, int, dict[str, torch.Tensor], float] | None = None
    n_held = int(episode[held].unique().numel()) if episode is not None and held.any() else 0
    info: dict[str, Any] = {"val_episodes": n_held}
    loss = torch.tensor(0.0)
    stopped = steps
    model.train()
    for step in range(1, steps + 1):
        idx = train[torch.randint(0, len(train), (min(bsz, len(train)),), generator=g)]
        fi = f[idx]
        if seen:
            which_view = torch.randint(0, 1 + len(seen), (len(idx),), generator=g)
            fi = fi.clone()
            for k, v in enumerate(seen, start=1):
                fi[which_view == k] = v[idx[which_view == k]]
        if reads == "pixels":
            fi = random_shift(fi, SHIFT_PAD * max(1, fi.shape[-1] // 64), g)
        elif feature_noise > 0 and reads in ("features", "tokens") and fi.shape[-1] > 0:
            fi = fi + feature_noise * torch.randn(fi.shape, generator=g)
        objects = target_est is not None and state is not None and target_index is not None
        loss = head_loss(
            model,
            fi,
            p[idx],
            y[idx],
            bin_mask,
            target_est[idx] if objects and target_est is not None else None,
            state[idx] if objects and state is not None else None,
            target_index[idx] if objects and target_index is not None else None,
            generator=g,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, float(loss.detach()))
        if held.any() and (step % every == 0 or step == steps):
            err = _held_out_error(model, stats, f[held], p[held], actions[held])
            # An object head stops on what it is trained on: the action and the estimate (the
            # estimate converges after the action error on demonstration frames does).
            score = err
            if isinstance(model, ObjectHead) and target_est is not None:
                score += ESTIMATE_WEIGHT * _estimate_mse(model, f[held], p[held], target_est[held])
            model.train()
            if best is None or score < best[0]:
                best = (score, step, copy.deepcopy(model.state_dict()), err)
            elif step - best[1] >= max(steps // 4, 2 * every):
                stopped = step
                break
    if best is not None:
        model.load_state_dict(best[2])
        info |= {"best_step": best[1], "val_mse": best[3], "stopped_at": stopped}
    model.eval()
    if isinstance(model, ObjectHead) and target_est is not None and held.any():
        info["val_estimate_rmse_cm"] = estimate_rmse_cm(model, f[held], p[held], target_est[held])
    return HeadFit(model, stats, float(loss.detach()), info)


def head_loss(
    model: nn.Module,
    f: torch.Tensor,
    p: torch.Tensor,
    y: torch.Tensor,
    bin_mask: torch.Tensor,
    target_est: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    target_index: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A head's training loss on normalized inputs (`head_inputs`) and targets: the diffusion
    head's noise prediction (`y`: action chunks), an object head's action error plus its
    estimate held to the logged state (when given), or the action error (MSE on continuous
    dimensions, cross-entropy on binary ones)."""
    if isinstance(model, DiffusionHead):
        out: torch.Tensor = model.loss(f, p, y, generator=generator)
        return out
    if isinstance(model, ObjectHead) and target_est is not None and state is not None:
        assert target_index is not None
        act, est, objects = model.forward_with_estimate(f, p)
        est_loss = ((est - target_est) ** 2).mean() + slot_loss(objects, state, target_index)
        loss = _mixed_loss(act, y, bin_mask) + ESTIMATE_WEIGHT * est_loss
        logits = model.select_logits(p)
        if logits is not None:  # the instruction says which slot
            loss = loss + nn.functional.cross_entropy(logits, target_index)
        return loss
    return _mixed_loss(model(f, p), y, bin_mask)


def normalized_targets(
    stats: dict[str, torch.Tensor], actions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Actions in the units a head is trained on: z-scored by the policy's stats, binary
    dimensions as 0/1 (`binary_dims`). Returns (targets, the binary dimensions' mask)."""
    y = (actions - stats["act_mean"]) / stats["act_std"]
    mask = stats.get("bin_mask")
    if mask is None:
        return y, torch.zeros(y.shape[-1], dtype=torch.bool)
    return torch.where(mask.bool(), (actions == stats["bin_hi"]).float(), y), mask.bool()


def _mixed_loss(out: torch.Tensor, y: torch.Tensor, bin_mask: torch.Tensor) -> torch.Tensor:
    """MSE on continuous dimensions, binary cross-entropy on binary ones, averaged per dim."""
    mse = (out - y) ** 2
    if bin_mask.any():
        bce = nn.functional.binary_cross_entropy_with_logits(out, y, reduction="none")
        mse = torch.where(bin_mask, bce, mse)
    return mse.mean()


@torch.no_grad()
def _held_out_error(
    model: nn.Module,
    stats: dict[str, torch.Tensor],
    f: torch.Tensor,
    p: torch.Tensor,
    actions: torch.Tensor,
) -> float:
    """Action MSE in units of the action std on held-out frames (what `eval` reports)."""
    model.eval()
    out = torch.cat([model(f[i : i + 512], p[i : i + 512]) for i in range(0, len(f), 512)])
    a = decode_actions(stats, out)
    return float((((a - actions) / stats["act_std"]) ** 2).mean())


def slot_loss(
    objects: torch.Tensor, state: torch.Tensor, target_index: torch.Tensor
) -> torch.Tensor:
    """Holds an object head's slots (B, S, 3, dm, relative to the grasp point) to every object,
    slot k to the simulator's object k: the logged state names the instructed object first and
    the others in order, and `target_index` (B,) says where the instructed one goes.

    Identity must be told, not left to the loss: with the instructed object's place left free
    (the closest of the S orderings), slots learned "the object the arm is heading for",
    which the frames of a demonstration show and closed loop does not (measured: the
    instruction then chose the right slot on 62% of frames).
    """
    B, S, _ = objects.shape
    target = state[:, 11:14]
    others = state[:, 16 : 16 + 3 * (S - 1)].reshape(B, S - 1, 3)
    order = torch.empty_like(objects)
    slot = torch.arange(S)[None].expand(B, -1)
    is_target = slot == target_index[:, None]
    order[is_target] = target
    order[~is_target] = others.reshape(-1, 3)
    return ((objects - order * ESTIMATE_UNIT) ** 2).mean()


@torch.no_grad()
def _estimates(model: ObjectHead, f: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    model.eval()
    chunks = [model.estimate(f[i : i + 512], p[i : i + 512]) for i in range(0, len(f), 512)]
    return torch.cat(chunks)


def _estimate_mse(
    model: ObjectHead, f: torch.Tensor, p: torch.Tensor, target: torch.Tensor
) -> float:
    return float(((_estimates(model, f, p) - target) ** 2).mean())


@torch.no_grad()
def estimate_rmse_cm(
    model: ObjectHead, f: torch.Tensor, p: torch.Tensor, target: torch.Tensor
) -> dict[str, float]:
    """RMSE (cm) of an object head's estimate per quantity: the instructed object relative to
    the grasp point (x, y, z) and the plate relative to it (x, y)."""
    rmse = ((_estimates(model, f, p) - target) ** 2).mean(0).sqrt() * (100.0 / ESTIMATE_UNIT)
    names = ("object_x", "object_y", "object_z", "plate_x", "plate_y")
    return {n: round(float(v), 3) for n, v in zip(names, rmse[:5], strict=True)}


def train_head(
    features: torch.Tensor,
    proprio: torch.Tensor,
    actions: torch.Tensor,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, torch.Tensor], float]:
    """`fit_head` as (model, stats, final loss)."""
    fit = fit_head(features, proprio, actions, **kwargs)
    return fit.model, fit.stats, fit.loss


def head_input(
    head: str, data: dict[str, torch.Tensor], encoder: nn.Module | None, preprocess: Any
) -> torch.Tensor:
    """What head `head` reads of collected `data` (`collect`): frozen backbone features or
    tokens, the oracle state, the frames, or (blind) the proprio as a placeholder."""
    reads = HEAD_KINDS[head].reads
    if reads in ("features", "tokens"):
        if encoder is None:
            raise ValueError(f"head {head} reads the backbone: give an encoder")
        return encode_frames(encoder, preprocess, data["rgb"], view=reads)
    if reads == "state":
        if "state" not in data:
            raise ValueError("the oracle head needs collect(..., state=True)")
        return data["state"]
    if reads == "pixels":
        return data["rgb"]
    return data["proprio"]


def policy_input(
    policy: Policy,
    data: dict[str, torch.Tensor],
    encoder: nn.Module | None,
    preprocess: Preprocess,
    cache: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """What a loaded policy reads of collected `data`, through `encoder` when it reads the
    backbone (`cache` keeps one encoding per view for several policies)."""
    reads = policy.reads
    if reads in ("features", "tokens"):
        if cache is not None and reads in cache:
            return cache[reads]
        if encoder is None:
            raise ValueError("this policy reads the backbone: give an encoder")
        out = encode_frames(encoder, preprocess, data["rgb"], view=reads)
        if cache is not None:
            cache[reads] = out
        return out
    if reads == "pixels":
        from dynaflip_adapt.data.frames import resize_uint8

        return resize_uint8(data["rgb"], policy.image_size or int(data["rgb"].shape[-1]))
    if reads == "state":
        if "state" not in data:
            raise ValueError("the oracle head needs collect(..., state=True)")
        return data["state"]
    return data["proprio"]


def fit_policy(
    encoder: nn.Module | None,
    preprocess: Preprocess,
    data: dict[str, torch.Tensor],
    *,
    head: str,
    tolerance: float,
    pin: dict[str, Any],
    steps: int | None = None,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    val_fraction: float = 0.1,
    appearance: int = 0,
    styles: torch.Tensor | None = None,
) -> tuple[Policy, float]:
    """Trains a head on `data` (from `collect`) -> an unsaved policy (spec, weights, stats incl.
    a 64-frame probe of its own frames) and its final train loss. The policy is
    language-conditioned when `data` carries instruction embeddings; `val_fraction` of the
    episodes are held out to stop on. With `appearance` > 0 an image head also trains on that
    many relit copies of the frames (`appearance_views`, styled after `styles` frames), so
    it learns to read what a change of light or surface leaves alone."""
    inputs = head_input(head, data, encoder, preprocess)
    views = []
    if appearance and head in FRAME_HEADS:
        from dynaflip_adapt.train.augment import appearance_views

        for k in range(appearance):
            shifted = appearance_views(data["rgb"], styles, seed=1000 * seed + k)
            views.append(head_input(head, {**data, "rgb": shifted}, encoder, preprocess))
    language = data.get("language")
    fit = fit_head(
        inputs,
        data["proprio"],
        data["actions"],
        head=head,
        steps=steps,
        seed=seed,
        episode=data["episode"],
        language=language,
        val_fraction=val_fraction,
        state=data.get("state") if HEAD_KINDS[head].needs_state else None,
        target_index=data.get("target_index") if HEAD_KINDS[head].needs_state else None,
        on_step=on_step,
        views=views,
    )
    stats = fit.stats
    sel = torch.linspace(0, len(data["rgb"]) - 1, min(64, len(data["rgb"]))).round().long()
    stats |= {"probe_rgb": data["rgb"][sel], "probe_proprio": data["proprio"][sel]}
    if language is not None:
        stats["probe_language"] = language[sel]
    kind = HEAD_KINDS[head]
    feature_dim = 0 if kind.reads in ("pixels", "none") else int(inputs.shape[-1])
    more: dict[str, Any] = {
        "train_loss": fit.loss,
        "train_frames": len(inputs),
        "validation": fit.info,
        "seed": seed,
    }
    if views:
        more["appearance_views"] = len(views)
    if kind.reads == "pixels":
        more["image_size"] = int(data["rgb"].shape[-1])
    spec = policy_spec(
        head,
        feature_dim,
        data["proprio"].shape[1],
        data["actions"].shape[1],
        tolerance,
        pin,
        {**more, **(extra or {})},
        language_dim=0 if language is None else language.shape[1],
    )
    return Policy(None, spec, fit.model, stats), fit.loss
