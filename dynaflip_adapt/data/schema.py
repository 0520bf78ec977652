"""Machine-readable HDF5 layout schemas (``data_schemas/*.json``) and the checks they drive.

A schema declares, per layout, where episodes live, how cameras are discovered, which fields exist
with their dtype kinds and symbolic shapes, and default per-source settings. Shapes use symbols
(``T`` frames, ``H``/``W`` image size, ``A`` action dim, ``P`` points, ``*`` anything, ``T-stride``
for flow pairs) that must bind consistently across the fields of an episode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np

from dynaflip_adapt.resources import shipped_dir

# The simulator's objects, in the order its logs' `obs/object_state` lists them (after the
# instructed one) and the names episode attribute `target_object` takes: what object heads read.
SIM_OBJECTS = ("red_cube", "green_cylinder", "blue_cube")

# Detection order: most specific first.
SCHEMA_FILES = ("native", "aloha_jpeg", "aloha", "libero", "robomimic")


@dataclass(frozen=True)
class FieldSpec:
    """One field of an episode.

    Attributes:
        name: Canonical role (``rgb``, ``depth``, ``actions``...).
        path: HDF5 path relative to the episode group; ``{camera}`` is substituted.
        dtypes: Accepted dtype kinds (``uint8``, ``uint16``, ``float``, ``int``, ``number``,
            ``bool``).
        shapes: Accepted symbolic shapes (any one must match).
        required: Whether an episode without it is malformed.
        per_camera: Whether the path contains ``{camera}``.
        finite: Whether NaN/inf values are malformed.
        minimum: Smallest allowed value, if any.
        encoding: ``"jpeg"`` for compressed image bytes.
    """

    name: str
    path: str
    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int | str, ...], ...]
    required: bool = False
    per_camera: bool = False
    finite: bool = False
    minimum: float | None = None
    encoding: str | None = None
    doc: str = ""

    def resolve(self, camera: str | None) -> str:
        """HDF5 path for a camera."""
        return self.path.format(camera=camera) if self.per_camera else self.path

    def describe_shape(self) -> str:
        """The accepted shapes in words, e.g. ``(T, H, W, 3)``."""
        return " or ".join("(" + ", ".join(str(d) for d in s) + ")" for s in self.shapes)

    def describe_dtype(self) -> str:
        """The accepted dtype kinds in words."""
        return " or ".join(self.dtypes)


@dataclass(frozen=True)
class LayoutSchema:
    """A parsed layout schema document."""

    layout: str
    schema_version: int
    title: str
    description: str
    raw: dict[str, Any]
    fields: dict[str, FieldSpec]
    flow_fields: dict[str, FieldSpec] = field(default_factory=dict)

    @property
    def file_per_episode(self) -> bool:
        return bool(self.raw["episodes"].get("file_per_episode", False))

    @property
    def episode_group(self) -> str:
        return str(self.raw["episodes"].get("group", ""))

    @property
    def episode_prefix(self) -> str:
        return str(self.raw["episodes"].get("prefix", ""))

    @property
    def camera_pattern(self) -> str:
        return str(self.raw["cameras"]["discover"])

    @property
    def preferred_cameras(self) -> tuple[str, ...]:
        return tuple(self.raw["cameras"].get("preferred", ()))

    @property
    def proprio(self) -> dict[str, Any]:
        return dict(self.raw.get("proprio", {}))

    @property
    def language(self) -> dict[str, Any]:
        return dict(self.raw.get("language", {}))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.raw.get("settings", {}))

    @property
    def file_attrs(self) -> dict[str, Any]:
        return dict(self.raw.get("file_attrs", {}))


def _shape_list(raw: Any) -> tuple[tuple[int | str, ...], ...]:
    if raw and isinstance(raw[0], list):
        return tuple(tuple(s) for s in raw)
    return (tuple(raw),)


def _field(name: str, raw: dict[str, Any], path: str | None = None) -> FieldSpec:
    return FieldSpec(
        name=name,
        path=path if path is not None else raw["path"],
        dtypes=tuple(raw["dtype"]),
        shapes=_shape_list(raw["shape"]),
        required=bool(raw.get("required", False)),
        per_camera=bool(raw.get("per_camera", False)),
        finite=bool(raw.get("finite", False)),
        minimum=raw.get("min"),
        encoding=raw.get("encoding"),
        doc=str(raw.get("doc", "")),
    )


def parse_schema(raw: dict[str, Any]) -> LayoutSchema:
    """Parses a schema document (already loaded from JSON)."""
    fields = {name: _field(name, spec) for name, spec in raw["fields"].items()}
    flow = raw.get("flow", {})
    flow_fields = {
        name: _field(name, spec, path=name) for name, spec in flow.get("fields", {}).items()
    }
    return LayoutSchema(
        layout=raw["layout"],
        schema_version=int(raw["schema_version"]),
        title=raw.get("title", raw["layout"]),
        description=raw.get("description", ""),
        raw=raw,
        fields=fields,
        flow_fields=flow_fields,
    )


@cache
def load_schema(layout: str) -> LayoutSchema:
    """Loads the shipped schema of a layout by name."""
    path = shipped_dir("data_schemas") / f"{layout}.json"
    with open(path, encoding="utf-8") as fh:
        return parse_schema(json.load(fh))


def all_schemas() -> dict[str, LayoutSchema]:
    """Every shipped layout schema, by layout name, in detection order."""
    return {name: load_schema(name) for name in SCHEMA_FILES}


def dtype_kind_ok(dtype: np.dtype, kinds: tuple[str, ...]) -> bool:
    """Whether a numpy dtype belongs to one of the named kinds."""
    for kind in kinds:
        if kind == "float" and np.issubdtype(dtype, np.floating):
            return True
        if kind == "int" and np.issubdtype(dtype, np.integer):
            return True
        if kind == "number" and (
            np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
        ):
            return True
        if kind == "bool" and dtype == np.bool_:
            return True
        if kind in ("uint8", "uint16") and dtype == np.dtype(kind):
            return True
    return False


def match_shape(
    shape: tuple[int, ...],
    specs: tuple[tuple[int | str, ...], ...],
    bindings: dict[str, int],
) -> tuple[bool, dict[str, int]]:
    """Matches a concrete shape against symbolic shapes.

    Symbols already in `bindings` must agree; new symbols are bound. ``"T-stride"`` style
    expressions subtract a bound symbol. ``"*"`` matches any extent.

    Returns:
        ``(matched, new_bindings)``; `bindings` itself is not modified.
    """
    for spec in specs:
        if len(spec) != len(shape):
            continue
        new = dict(bindings)
        ok = True
        for dim, want in zip(shape, spec, strict=True):
            if want == "*":
                continue
            if isinstance(want, int):
                ok = dim == want
            elif "-" in want:
                base, off = want.split("-", 1)
                if base in new and off in new:
                    ok = dim == new[base] - new[off]
                elif base in new and off.isdigit():
                    ok = dim == new[base] - int(off)
            elif want in new:
                ok = dim == new[want]
            else:
                new[want] = dim
            if not ok:
                break
        if ok:
            return True, new
    return False, bindings


def describe_bound(spec: FieldSpec, bindings: dict[str, int]) -> str:
    """The expected shape with known symbols substituted, e.g. ``(50, H, W, 3)`` for T=50."""
    out = []
    for s in spec.shapes:
        dims = []
        for d in s:
            if isinstance(d, str) and d in bindings:
                dims.append(str(bindings[d]))
            elif isinstance(d, str) and "-" in d:
                base, off = d.split("-", 1)
                if base in bindings and off in bindings:
                    dims.append(str(bindings[base] - bindings[off]))
                else:
                    dims.append(d)
            else:
                dims.append(str(d))
        out.append("(" + ", ".join(dims) + ")")
    return " or ".join(out)
