"""Recipes: YAML files validated by pydantic models (``extra="forbid"``), with dotted overrides.

Every problem in a recipe is reported at once, each as ``FILE: KEY: found ..., expected ...``.
A recipe's ``kind`` (``pretrain``, ``finetune`` or ``monitor``) selects its model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dynaflip_adapt.errors import InputError, format_problem
from dynaflip_adapt.resources import shipped_dir

Orientation = Literal["none", "flip_vertical", "flip_horizontal", "rotate180"]
Layout = Literal["native", "robomimic", "libero", "aloha", "aloha_jpeg"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(_Section):
    """How site logs are read (per-source settings) and paired."""

    layout: Layout | None = Field(None, description="force a layout; default: auto-detect")
    camera: str | None = Field(None, description="camera to read; default: layout's preferred")
    orientation: Orientation | None = Field(None, description="default: the layout's")
    depth_scale: float | None = Field(None, gt=0, description="stored depth -> metres")
    language: str | None = Field(None, description="instruction for logs that carry none")
    proprio_keys: list[str] | None = Field(None, description="low-dim keys forming proprio")
    flow_source: str | None = Field(None, description="flow/<source> group to use")
    gap: int = Field(4, ge=1, description="frames between the two images of a transition")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes")
    batch_groups: int = Field(
        0,
        ge=0,
        description="pretrain: each batch draws from this many log files (sites), in chunks "
        "of batch_size / batch_groups. A flow field's static points outline the surfaces its "
        "camera sees, so with negatives from other sites the contrastive terms are solved by "
        "matching the camera pose; within one site only the motion tells triplets apart (0: "
        "batches drawn at random over all logs)",
    )

    def source_settings(self, **cli: Any) -> Any:
        """`SourceSettings` from this section; non-None keyword arguments (CLI options) win."""
        from dynaflip_adapt.data.logs import SourceSettings

        values: dict[str, Any] = {
            "layout": self.layout,
            "camera": self.camera,
            "orientation": self.orientation,
            "depth_scale": self.depth_scale,
            "language": self.language,
            "proprio_keys": tuple(self.proprio_keys) if self.proprio_keys else None,
            "flow_source": self.flow_source,
        }
        values |= {k: v for k, v in cli.items() if v is not None}
        return SourceSettings(**values)


class ModelSection(_Section):
    """Backbone architecture (ViT image encoder, language projection, flow encoder)."""

    image_size: int = Field(64, ge=16, description="square input size (pixels)")
    patch_size: int = Field(8, ge=2)
    width: int = Field(128, ge=16, description="ViT token width")
    depth: int = Field(4, ge=1, description="ViT blocks")
    heads: int = Field(4, ge=1)
    mlp_ratio: float = Field(4.0, gt=0)
    embed_dim: int = Field(128, ge=8, description="dimension of the shared hypersphere")
    text_encoder: Literal["minilm", "hashed"] = Field(
        "minilm", description="frozen all-MiniLM-L6-v2, or a tiny hashed encoder for tests"
    )
    flow_points: int = Field(256, ge=8, description="points sampled per flow field")
    flow_width: int = Field(128, ge=16)

    # Pairs of fields checked together are blamed on the section: either field may be the
    # one the user changed (a field validator would always blame the second).
    @model_validator(mode="after")
    def _sizes_divide(self) -> ModelSection:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} must divide image_size {self.image_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"heads {self.heads} must divide width {self.width}")
        return self


class OptimSection(_Section):
    """AdamW with linear warm-up and cosine decay."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(50, ge=0)
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=2, description=">= 2: in-batch negatives")
    grad_clip: float = Field(1.0, gt=0)


class LossSection(_Section):
    """Loss weights both recipe kinds read; zero disables a term."""

    area: float = Field(1.0, ge=0, description="simplex (triangle) area of the three embeddings")
    cosine: float = Field(0.5, ge=0, description="cosine regularizer, language <-> flow")
    contrastive: float = Field(1.0, ge=0, description="InfoNCE with the area as energy")
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class PretrainLoss(LossSection):
    """Pretraining loss weights (a finetune-only key here is refused, not ignored)."""

    cosine_margin: float | None = Field(
        0.5,
        ge=-1,
        le=1,
        description="keep cos(language, flow) below this (anti-degeneracy); "
        "null pulls them together",
    )
    temperature_init: float = Field(
        0.07, gt=0, description="initial temperature of the learnable InfoNCE scale"
    )
    pairwise: float = Field(
        0.0,
        ge=0,
        description="CLIP-style cosine InfoNCE from the image transition to its flow "
        "(in-batch negatives, both directions) and to its instruction (all instructions as "
        "negatives): "
        "the area term is zero when the image sits on either other vertex, so on its own it "
        "does not say which one the image lies near; this trains the retrieval that "
        "`backbones eval` measures",
    )
    temporal: float = Field(0.0, ge=0, description="temporal contrastive (nearby frames)")
    temporal_space: Literal["head", "features"] = Field(
        "head",
        description="where the temporal term compares frames: through the single-frame "
        "projection head, or on the image encoder's own features (what policies read; the head "
        "can tell frames apart from tiny feature differences, the features cannot hide behind it)",
    )
    flow_prediction: float = Field(0.0, ge=0, description="one-step 3D-flow prediction head")
    point_position: float = Field(
        0.0,
        ge=0,
        description="each flow point's 3D position (relative to the scene's centroid) "
        "regressed from the patch token at its pixel, so tokens say where things are",
    )
    point_motion: float = Field(
        0.0,
        ge=0,
        description="each flow point's 3D motion regressed from the tokens at its "
        "pixel at both ends of the transition (a dense flow head)",
    )
    variance: float = Field(
        0.0,
        ge=0,
        description="VICReg-style variance floor on single-frame image features: hinge on each "
        "dimension's batch std below variance_target (without it the CLS features of every frame "
        "sit near one point and only their differences carry information)",
    )
    variance_target: float = Field(0.5, gt=0, description="per-dimension std floor")
    token_invariance: float = Field(
        0.0,
        ge=0,
        description="the patch tokens (and CLS) of a relit copy of each frame (another "
        "pretraining site's low-frequency appearance on half of them, photometric jitter on "
        "all; geometry kept) held to the frame's own tokens (stop-gradient, relative to their "
        "spread): a backbone whose token map a change of light does not move, so heads "
        "trained at one site read it at another",
    )
    anchor_ramp_steps: int = Field(
        0,
        ge=0,
        description="ramp the area and cosine weights from 0 over these steps: minimised first, "
        "they collapse every embedding to one point, where the contrastive term has no gradient",
    )


class FinetuneLoss(LossSection):
    """Finetuning loss weights: the anchors plus the teacher's terms (a pretrain-only key
    here is refused, not ignored)."""

    single_frame: float = Field(0.0, ge=0, description="anchor on single-frame embeddings")
    distill_replay: float = Field(0.0, ge=0, description="teacher distillation, source replay")
    replay_area: float = Field(
        0.0,
        ge=0,
        description="simplex area of the backbone's replay triplets (source transitions with "
        "their language and flow) under the adapted encoder: the anchors on the source site too, "
        "so the audit's replay geometry check holds",
    )
    replay_area_hinge: bool = Field(
        False,
        description="penalise only a replay triplet's area above the base encoder's (not worse "
        "than before, the audit's criterion) instead of minimising it",
    )
    distill_site: float = Field(
        0.0, ge=0, description="teacher distillation, new-site frames (student sees them augmented)"
    )
    invariance: float = Field(
        0.0,
        ge=0,
        description="teacher distillation on the teacher's pool (source replay + --retain "
        "frames) with the student seeing the frames augmented and the teacher clean: invariance "
        "to the augmentation's shifts, anchored at the features the fleet's policies read "
        "(measured to help with --retain only)",
    )
    distill_tokens: bool = Field(
        False,
        description="the teacher terms (distill_replay, invariance, distill_site) also hold "
        "every patch token to the teacher's (relative drift), not only the pooled CLS feature: "
        "what heads reading the token map (objects, tokens) consume",
    )
    policies: float = Field(
        0.0,
        ge=0,
        description="the frozen heads of the policies pinned to the site, reading the adapter, "
        "held to their own training loss on the demonstrations in the site's logs and the "
        "--retain logs (those with actions): the adapter learns what the heads read at the new "
        "site while the retained sites keep working; off when no pinned policy reads the "
        "backbone or the logs carry no actions",
    )
    bct: float = Field(
        0.0,
        ge=0,
        description="backward-compatible training (influence loss): the adapted features of a "
        "source replay frame must retrieve the teacher's features of the frame after it among "
        "the replay set's, the audit's bct_retrieval.replay check as a loss (trained on the "
        "replay frames the audit does not probe)",
    )
    teacher: Literal["backbone", "parent"] = Field(
        "backbone",
        description="whom the teacher terms hold the student to: the bare backbone, or the "
        "encoder the adapter starts from (with --from, the parent adapter merged: on a chain's "
        "retained frames of earlier conditions it keeps what the earlier links bought, where "
        "the backbone would pull them back; without --from the two are the same)",
    )
    site_style: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of the invariance term's views that first take the site's appearance "
        "(the low spatial frequencies' amplitude of one of the batch's site frames, Fourier "
        "domain adaptation): the teacher sees the clean source frame, so the adapter learns to "
        "read the site's lighting and surfaces as the base features, without paired frames",
    )
    site_style_band: float = Field(
        0.06,
        ge=0,
        le=0.5,
        description="half-width of the swapped frequencies as a fraction of the image side "
        "(0: each channel's mean only)",
    )
    distill_space: Literal["relative", "standardized"] = Field(
        "relative",
        description="distillation error: relative to the teacher's feature norm, or per "
        "dimension in units of the teacher's spread over the replay set (what z-scoring policy "
        "heads see)",
    )
    align: float = Field(
        0.0,
        ge=0,
        description="moment alignment (CORAL-style, diagonal): the site batch's per-dimension "
        "feature mean and spread match the teacher's on the source replay, in its units",
    )
    consistency: float = Field(
        0.0,
        ge=0,
        description="augmentation consistency on site frames (student vs itself, no teacher; "
        "an ablation: alone it collapses the features)",
    )


class LoraSection(_Section):
    """PEFT LoRA adapter on the image encoder."""

    r: int = Field(8, ge=1)
    alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])
    use_dora: bool = False

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("at least one target module")
        return v


class AugmentSection(_Section):
    """kornia photometric/geometric augmentation applied to site frames."""

    enabled: bool = True
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0)
    saturation: float = Field(0.2, ge=0)
    hue: float = Field(0.02, ge=0, le=0.5)
    planckian_p: float = Field(0.3, ge=0, le=1)
    shadow_p: float = Field(0.2, ge=0, le=1)
    gamma_p: float = Field(0.3, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0)
    crop_scale: tuple[float, float] = (0.85, 1.0)
    invariance_crop: bool = Field(
        False,
        description="the invariance term (loss.invariance) also draws the resized crop; off: "
        "photometric shifts only, so features keep where things are in the frame",
    )


class EmaSection(_Section):
    """Exponential moving average of the adapter weights (torch-ema)."""

    enabled: bool = True
    decay: float = Field(0.995, gt=0, lt=1)


class ReplaySection(_Section):
    """Source-site replay frames carried by a backbone (retention and audit probe)."""

    frames: int = Field(256, ge=0, description="frames stored with the backbone")
    fraction: float = Field(
        0.25, ge=0, le=1, description="share of each finetune batch drawn from the replay"
    )


class RunSection(_Section):
    """Seeds, checkpoints and device."""

    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    log_every: int = Field(10, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: CUDA, else MPS, else CPU"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="autocast: auto = bf16 on CUDA, fp32 elsewhere"
    )


class PretrainRecipe(_Section):
    """``dynaflip-adapt pretrain``: the base backbone from triplets."""

    kind: Literal["pretrain"]
    description: str = ""
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    loss: PretrainLoss = PretrainLoss()
    augment: AugmentSection = Field(
        AugmentSection(enabled=False),
        description="the same kornia pipeline as finetune, one draw shared by both frames of a "
        "transition (appearance diversity beyond the logs' sites)",
    )
    replay: ReplaySection = ReplaySection()
    run: RunSection = RunSection()


class FinetuneRecipe(_Section):
    """``dynaflip-adapt finetune``: a LoRA adapter for a site, anchored to the base geometry."""

    kind: Literal["finetune"]
    description: str = ""
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection(lr=1e-3, warmup_steps=20, max_steps=400)
    loss: FinetuneLoss = FinetuneLoss(distill_replay=1.0)
    lora: LoraSection = LoraSection()
    augment: AugmentSection = AugmentSection()
    ema: EmaSection = EmaSection()
    replay: ReplaySection = ReplaySection()
    run: RunSection = RunSection()
    require: list[Literal["language", "depth", "flow"]] = Field(
        default_factory=list, description="anchors whose absence aborts the run"
    )


# Calibrated on the simulator (docs/design.md, "Drift"): a bc and a diffusion head on the shipped
# backbone scored 20 same-site draws at most 0.048; the light shift warm_dim at least 0.13.
ACTION_DRIFT_THRESHOLD = 0.1


class DriftSection(_Section):
    """The label-free drift score of `monitor` (docs/design.md, "Drift")."""

    threshold: float = Field(
        0.04,
        gt=0,
        description="score above which the verdict is 'adapt'; calibrated on the simulator with "
        "the shipped backbone: 20 draws of 16 new same-site episodes scored 0.007-0.029, the "
        "mildest shifted preset (a moved camera) 0.050-0.102",
    )
    frames: int = Field(256, ge=8, description="frames sampled from each side, over every episode")


class ActionDriftSection(_Section):
    """How far the site's pinned image policies' actions move between the reference frames and
    the new ones (docs/design.md, "Drift")."""

    enabled: bool = Field(True, description="score the pinned policies' actions too")
    threshold: float = Field(
        ACTION_DRIFT_THRESHOLD,
        gt=0,
        description="action MMD^2 (in action-std units) above which the verdict is 'adapt'; "
        "calibrated on the simulator with the shipped backbone: 20 draws of 16 new same-site "
        "episodes scored at most 0.048 (bc and diffusion heads), warm_dim light 0.13-0.70",
    )


class MonitorRecipe(_Section):
    """``dynaflip-adapt monitor``: when a site's new logs no longer fit its production encoder."""

    kind: Literal["monitor"]
    description: str = ""
    drift: DriftSection = DriftSection()
    actions: ActionDriftSection = ActionDriftSection()


Recipe = Annotated[PretrainRecipe | FinetuneRecipe | MonitorRecipe, Field(discriminator="kind")]
RECIPE_KINDS: dict[str, type[BaseModel]] = {
    "pretrain": PretrainRecipe,
    "finetune": FinetuneRecipe,
    "monitor": MonitorRecipe,
}


class RecipeError(InputError):
    """A recipe with one or more problems; `problems` lists them all."""

    def __init__(self, file: str | Path | None, problems: list[tuple[str, str, str]]) -> None:
        self.problems = problems
        key, found, expected = problems[0]
        super().__init__(file, key, found, expected)
        if len(problems) > 1:
            rest = "; ".join(format_problem(None, k, f, e) for k, f, e in problems[1:])
            self.args = (f"{self.args[0]}; {rest}",)


# --------------------------------------------------------------------------------------------
# Shipped recipes


def recipes_dir() -> Path:
    """The folder of shipped recipes."""
    return shipped_dir("recipes")


def list_recipes() -> dict[str, Path]:
    """Shipped recipes by name (``finetune/conservative``)."""
    root = recipes_dir()
    return {p.relative_to(root).with_suffix("").as_posix(): p for p in sorted(root.rglob("*.yaml"))}


def find_recipe(name_or_path: str | Path, kind: str | None = None) -> Path:
    """Resolves a shipped recipe name (full or unique basename, among `kind`'s recipes when
    given: ``default`` is ``finetune/default`` to finetune) or a file path.

    Raises:
        InputError: Neither an existing file nor a known name; lists the valid names.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    shipped = list_recipes()
    key = str(name_or_path).removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    by_base = [v for k, v in shipped.items() if k.rsplit("/", 1)[-1] == key]
    if len(by_base) > 1 and kind is not None:
        by_base = [v for k, v in shipped.items() if k == f"{kind}/{key}"]
    if len(by_base) == 1:
        return by_base[0]
    raise InputError(
        name_or_path,
        None,
        "no such recipe file or name" + (" (ambiguous)" if by_base else ""),
        "a YAML path or one of " + ", ".join(shipped),
    )


# --------------------------------------------------------------------------------------------
# Loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``a.b.c=value`` (value as YAML) into a key path and a value.

    Raises:
        InputError: Not of the form KEY=VALUE.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not k for k in key.strip().split(".")):
        raise InputError(
            None, "--set", repr(text), "KEY=VALUE with a dotted KEY, e.g. optim.lr=3e-4"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of `data` with dotted overrides applied.

    Raises:
        InputError: An override descends into a non-mapping value.
    """
    out = json.loads(json.dumps(data))
    for text in overrides:
        keys, value = parse_override(text)
        node = out
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise InputError(
                    None,
                    "--set " + ".".join(keys[: i + 1]),
                    f"a {type(nxt).__name__} value",
                    "a section (mapping) to descend into",
                )
            node = nxt
        node[keys[-1]] = value
    return out


def _loc(loc: Sequence[Any], kind: str | None) -> str:
    parts = [str(p) for p in loc]
    if parts and kind and parts[0] in RECIPE_KINDS and parts[0] == kind:
        parts = parts[1:]
    return ".".join(parts) or "(root)"


def _keys_at(model: type[BaseModel], path: Sequence[Any]) -> list[str]:
    """The field names of the section at `path` in `model` (none where there is no such
    section)."""
    section: Any = model
    for part in path:
        f = getattr(section, "model_fields", {}).get(part)
        section = f.annotation if f is not None else None
    return sorted(getattr(section, "model_fields", {}) or [])


def _problems(
    err: ValidationError, kind: str | None, model: type[BaseModel]
) -> list[tuple[str, str, str]]:
    out: list[tuple[str, str, str]] = []
    # Problems inside one list (``lora.target_modules: [0, 0, 0]``) are one problem of the list.
    in_list: dict[str, list[Any]] = {}  # list key -> [index in out, first item, more]
    for e in err.errors():
        loc = list(e["loc"])
        first_index = next((i for i, p in enumerate(loc) if isinstance(p, int)), None)
        if first_index is not None:
            key = _loc(loc[:first_index], kind)
            msg = e["msg"][0].lower() + e["msg"][1:] if e["msg"] else "a valid value"
            if key not in in_list:
                in_list[key] = [len(out), f"{e.get('input')!r} at item {loc[first_index]}", 0]
                out.append((key, in_list[key][1], msg))
            else:
                at, first, more = in_list[key]
                in_list[key][2] = more + 1
                out[at] = (key, f"{first} and {more + 1} more", out[at][2])
            continue
        key = _loc(loc, kind)
        if e["type"] == "extra_forbidden":
            valid = _keys_at(model, [p for p in e["loc"][:-1] if p != kind])
            found = "an unknown key"
            *path, leaf = e["loc"]
            other = [
                k for k in RECIPE_KINDS if k != kind and leaf in _keys_at(RECIPE_KINDS[k], path)
            ]
            if other:
                found = f"a {other[0]} setting, which a {kind} recipe does not read"
            out.append((key, found, "one of " + ", ".join(valid)))
            continue
        found = repr(e.get("input")) if e["type"] != "missing" else "nothing"
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append((key, found, msg[0].lower() + msg[1:] if msg else "a valid value"))
    return out


def load_recipe_data(path: str | Path) -> dict[str, Any]:
    """Reads a recipe file as a mapping.

    Raises:
        InputError: Unreadable file, invalid YAML, or not a mapping.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(p, None, exc.strerror or str(exc), "a readable YAML recipe") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InputError(p, where, f"invalid YAML ({problem})", "a YAML mapping") from None
    if not isinstance(data, dict):
        raise InputError(p, None, f"a {type(data).__name__}", "a YAML mapping with a 'kind' key")
    return data


def validate_recipe_data(data: dict[str, Any], file: str | Path | None = None) -> BaseModel:
    """Validates a recipe mapping, collecting every problem.

    Raises:
        RecipeError: One or more problems.
    """
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in RECIPE_KINDS:
        raise RecipeError(
            file,
            [
                (
                    "kind",
                    repr(kind) if kind is not None else "nothing",
                    "one of " + ", ".join(RECIPE_KINDS),
                )
            ],
        )
    model = RECIPE_KINDS[kind]
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RecipeError(file, _problems(err, kind, model)) from None


def load_recipe(
    name_or_path: str | Path, overrides: Sequence[str] = (), kind: str | None = None
) -> tuple[BaseModel, Path]:
    """Loads, overrides and validates a recipe.

    Args:
        name_or_path: A shipped name (``finetune/conservative``) or a YAML path.
        overrides: Dotted ``KEY=VALUE`` overrides.
        kind: When given, the recipe must be of this kind.

    Returns:
        The validated recipe model and the file it came from.

    Raises:
        InputError / RecipeError: Any problem; recipe problems are all reported together.
    """
    path = find_recipe(name_or_path, kind)
    data = apply_overrides(load_recipe_data(path), overrides)
    try:
        recipe = validate_recipe_data(data, path)
    except RecipeError as err:
        # A problem with a value the user gave by --set is theirs, not the recipe file's.
        raise _blame_overrides(err, overrides) from None
    if kind is not None and data.get("kind") != kind:
        raise InputError(path, "kind", repr(data.get("kind")), repr(kind))
    return recipe, path


def _blame_overrides(err: RecipeError, overrides: Sequence[str]) -> RecipeError:
    """`err` with each problem that an override caused named ``--set KEY`` (and no file when
    every problem came from an override)."""
    given = [".".join(parse_override(o)[0]) for o in overrides]

    def blame(key: str, found: str) -> str:
        ours = any(key == g or key.startswith(g + ".") for g in given)
        # `--set lora.r=4` on a pretrain recipe adds the unknown section `lora`.
        unknown = found.startswith("an unknown key") or found.endswith("does not read")
        created = unknown and any(g.startswith(key + ".") for g in given)
        return f"--set {key}" if ours or created else key

    problems = [(blame(k, f), f, e) for k, f, e in err.problems]
    mine = all(k.startswith("--set ") for k, _, _ in problems)
    return RecipeError(None if mine else err.file, problems)


def recipe_to_dict(recipe: BaseModel) -> dict[str, Any]:
    """A JSON-ready, fully resolved view of a recipe (every default filled in)."""
    return recipe.model_dump(mode="json")


def recipe_params(recipe: BaseModel) -> dict[str, str]:
    """The resolved recipe as flat MLflow params (``optim.lr``, ``lora.r``, ...), so runs
    compare by their settings in the UI, not only by `recipe_hash`."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, (list, bool)) else str(value)

    walk("", recipe_to_dict(recipe))
    out.pop("description", None)
    return out


_LATER_FIELDS: tuple[tuple[str, str, object], ...] = (
    ("loss", "distill_tokens", False),
    ("loss", "site_style", 0.0),
    ("loss", "policies", 0.0),
    ("loss", "teacher", "backbone"),
    ("loss", "bct", 0.0),
    ("loss", "site_style_band", 0.06),
    ("run", "precision", "auto"),
)


def device_overrides(device: str | None, precision: str | None) -> list[str]:
    """``--device`` / ``--precision`` as recipe overrides (validated, and logged with the
    recipe, like any other)."""
    out = [] if device is None else [f"run.device={device}"]
    return out + ([] if precision is None else [f"run.precision={precision}"])


def recipe_hash(recipe: BaseModel) -> str:
    """sha256 of the resolved recipe's canonical JSON without its description (``sha256:...``):
    two recipes that train the same way hash the same, whatever their prose says."""
    settings = recipe_to_dict(recipe)
    settings.pop("description", None)
    # Fields added after recipes were first hashed count only when set away from their default,
    # so an earlier recipe keeps its hash (and runs keyed by it are found again).
    for section, key, default in _LATER_FIELDS:
        if settings.get(section, {}).get(key, default) == default:
            settings.get(section, {}).pop(key, None)
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()
