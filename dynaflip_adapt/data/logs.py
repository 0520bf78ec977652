"""Opening site logs in any supported HDF5 layout as one canonical episode view.

`open_logs` walks files and folders, detects each file's layout (or takes ``--layout``), checks
the structure against the layout schema (metadata only: shapes, dtypes, lengths; cheap) and
returns picklable `Episode` records. `EpisodeReader` reads frames from them lazily, applying the
per-source settings (camera, orientation, depth units), so every layout looks the same downstream.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dynaflip_adapt.data.schema import (
    FieldSpec,
    LayoutSchema,
    all_schemas,
    describe_bound,
    dtype_kind_ok,
    load_schema,
    match_shape,
)
from dynaflip_adapt.errors import InputError

ORIENTATIONS = ("none", "flip_vertical", "flip_horizontal", "rotate180")
LOG_SUFFIXES = (".h5", ".hdf5", ".he5")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@dataclass(frozen=True)
class SourceSettings:
    """Per-source reading settings where layouts (or rigs) differ.

    Attributes:
        layout: Force a layout instead of auto-detecting it.
        camera: Camera to read; default: the layout's preferred camera present in the file.
        orientation: ``none``, ``flip_vertical``, ``flip_horizontal`` or ``rotate180``; default:
            the layout's (LIBERO stores images upside down).
        depth_scale: Multiplier taking stored depth to metres (e.g. 0.001 for uint16 mm);
            default: the file's ``depth_scale`` attribute, else the layout's.
        language: Instruction used for episodes whose log carries none.
        proprio_keys: Low-dimensional observation keys concatenated into the proprio vector.
        flow_source: Which ``flow/<source>`` group to use when several exist.
    """

    layout: str | None = None
    camera: str | None = None
    orientation: str | None = None
    depth_scale: float | None = None
    language: str | None = None
    proprio_keys: tuple[str, ...] | None = None
    flow_source: str | None = None

    def __post_init__(self) -> None:
        if self.orientation is not None and self.orientation not in ORIENTATIONS:
            raise InputError(
                None, "orientation", repr(self.orientation), "one of " + ", ".join(ORIENTATIONS)
            )
        if self.layout is not None and self.layout not in all_schemas():
            raise InputError(
                None, "layout", repr(self.layout), "one of " + ", ".join(all_schemas())
            )
        if self.depth_scale is not None and not (
            np.isfinite(self.depth_scale) and self.depth_scale > 0
        ):
            raise InputError(
                None, "depth_scale", repr(self.depth_scale), "a positive finite number"
            )


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a log: where it is, what was found, what was expected."""

    file: str
    key: str
    found: str
    expected: str

    def to_error(self) -> InputError:
        return InputError(self.file, self.key, self.found, self.expected)

    def __str__(self) -> str:
        return str(self.to_error())


@dataclass(frozen=True)
class FlowRef:
    """A ``flow/<source>`` group of an episode: pair t links frame t to frame t + stride."""

    source: str
    group: str
    stride: int
    num_points: int
    frame: str


@dataclass(frozen=True)
class Episode:
    """Metadata of one episode in the canonical view (picklable; holds no open file).

    Attributes:
        file: Absolute path of the HDF5 file.
        group: Absolute HDF5 path of the episode group (``/`` for one-file-per-episode layouts).
        name: Episode name (``demo_3`` or the file stem).
        layout: Detected or forced layout.
        length: Number of frames T.
        camera: Camera read by default.
        cameras: All cameras present.
        image_hw: Stored image size (H, W) of `camera`, after decoding.
        action_dim: A.
        proprio_paths: Absolute HDF5 paths concatenated into proprio.
        proprio_dim: Width of the proprio vector (0 when none).
        language: Instruction, if known.
        paths: Role -> absolute HDF5 path (``rgb``, ``actions``, optional ``depth``,
            ``intrinsics``, ``extrinsics``) for `camera`.
        flows: Available 3D-flow groups.
        orientation: Orientation applied on read.
        depth_scale: Multiplier from stored depth to metres.
        jpeg_index: Row of ``compress_len`` for `camera` when images are JPEG bytes.
    """

    file: str
    group: str
    name: str
    layout: str
    length: int
    camera: str
    cameras: tuple[str, ...]
    image_hw: tuple[int, int]
    action_dim: int
    proprio_paths: tuple[str, ...]
    proprio_dim: int
    language: str | None
    paths: dict[str, str]
    flows: tuple[FlowRef, ...] = ()
    orientation: str = "none"
    depth_scale: float = 1.0
    jpeg_index: int | None = None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)

    def has(self, role: str) -> bool:
        """Whether the episode carries a role (``depth``, ``intrinsics``, ``flow``...)."""
        if role == "flow":
            return bool(self.flows)
        if role == "language":
            return bool(self.language)
        if role == "proprio":
            return self.proprio_dim > 0
        return role in self.paths

    def flow(self, source: str | None = None, stride: int | None = None) -> FlowRef | None:
        """The flow group to use: matching `source` (name) and `stride` when given; ground
        truth first, then extracted groups in name order."""
        for f in self.flows:
            if (source is None or f.source == source) and (stride is None or f.stride == stride):
                return f
        return None


@dataclass
class LogFile:
    """One opened (and closed again) HDF5 file: its layout and episodes."""

    path: str
    layout: str
    schema_version: int
    episodes: list[Episode]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LogSet:
    """Every episode of a set of files, in a stable order."""

    files: list[LogFile]

    @property
    def episodes(self) -> list[Episode]:
        return [ep for f in self.files for ep in f.episodes]

    @property
    def num_frames(self) -> int:
        return sum(ep.length for ep in self.episodes)


# --------------------------------------------------------------------------------------------
# Finding files


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Expands files and folders into a sorted list of HDF5 files.

    Raises:
        InputError: A path does not exist, or a folder holds no HDF5 file.
    """
    if not paths:
        raise InputError(None, "LOGS", "no path", "at least one HDF5 file or folder")
    out: list[Path] = []
    for raw in paths:
        p = Path(raw).expanduser()
        try:
            is_dir = p.is_dir()
            exists = is_dir or p.exists()
        except PermissionError:
            raise InputError(p, None, "permission denied", "a readable file or folder") from None
        if not exists:
            raise InputError(p, None, "no such file or folder", "an HDF5 file or a folder of them")
        if is_dir:
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in LOG_SUFFIXES
            )
            if not found:
                raise InputError(
                    p,
                    None,
                    "a folder with no episodes (no *.h5/*.hdf5 files)",
                    "a folder holding HDF5 site logs",
                )
            out.extend(q.resolve() for q in found)
        else:
            out.append(p.resolve())
    # Keep order, drop duplicates (a file named twice, or inside a named folder).
    return list(dict.fromkeys(out))


def _natural_key(name: str) -> tuple[Any, ...]:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


def open_h5(path: str | Path) -> h5py.File:
    """Opens an HDF5 file read-only with errors that name the file and the cause.

    Raises:
        InputError: The file is empty, not HDF5, truncated, or unreadable.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
    except PermissionError:
        raise InputError(p, None, "permission denied", "a readable file") from None
    except FileNotFoundError:
        raise InputError(p, None, "no such file", "an HDF5 file") from None
    except IsADirectoryError:
        raise InputError(p, None, "a folder", "an HDF5 file") from None
    if size == 0:
        raise InputError(p, None, "an empty file (0 bytes)", "an HDF5 file")
    # HDF5 allows a user block (512, 1024... bytes) before the signature; let h5py decide for
    # files large enough to have one, but name the usual cause when it refuses.
    if head != _HDF5_MAGIC and size < 512:
        raise InputError(p, None, f"not an HDF5 file (starts with {head!r})", "an HDF5 file")
    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg or "eof" in msg.lower():
            found = f"a truncated HDF5 file ({size} bytes; {_short(msg)})"
        elif head != _HDF5_MAGIC:
            found = f"not an HDF5 file (starts with {head!r})"
        else:
            found = f"an unreadable HDF5 file ({_short(msg)})"
        raise InputError(p, None, found, "a complete HDF5 file") from None
    bad = _non_utf8_name(f)
    if bad is not None:
        f.close()
        where = f" ({bad!r})" if bad else ""
        raise InputError(
            p,
            bad.decode("utf-8", "replace") if bad else "/",
            f"a link name that is not UTF-8{where}: a damaged name table?",
            "UTF-8 group and dataset names",
        )
    return f


def _non_utf8_name(f: h5py.File) -> bytes | None:
    """The first link path whose bytes are not UTF-8 (b"" when only HDF5 saw it), or None.

    h5py hands such a name back as `bytes` instead of `str` (and its `visit` raises on it), so
    one damaged byte in a name table would otherwise surface later as a TypeError deep in the
    indexing. HDF5's own error about such a link carries the name, which h5py then fails to
    decode: a UnicodeDecodeError from the walk is the same damage. Other damage met on this
    walk is left to the readers, which report it.
    """
    found: list[bytes] = []

    def check(name: bytes) -> int | None:
        try:
            name.decode("utf-8")
        except UnicodeDecodeError:
            found.append(b"/" + name)
            return 1  # stops the walk before it descends into the damaged link
        return None

    try:
        f.id.links.visit(check)
    except UnicodeDecodeError:
        found.append(b"")  # the name is in HDF5's message, not in hand
    except (OSError, RuntimeError, KeyError, ValueError):
        pass
    return found[0] if found else None


def iter_blocks(ds: h5py.Dataset, block_bytes: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start row, array) blocks of about `block_bytes` along axis 0: bounded memory on any
    dataset size. A scalar or empty dataset is one block."""
    if ds.ndim == 0 or ds.shape[0] == 0:
        yield 0, np.asarray(ds[()])
        return
    row = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
    step = max(1, block_bytes // row)
    for start in range(0, ds.shape[0], step):
        yield start, np.asarray(ds[start : start + step])


def _short(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= 120 else msg[:117] + "..."


# --------------------------------------------------------------------------------------------
# Layout detection


def _attr(obj: h5py.HLObject, name: str) -> Any:
    value = obj.attrs.get(name)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _detect_one(f: h5py.File, schema: LayoutSchema) -> bool:
    rule = schema.raw.get("detect", {})
    for name, want in rule.get("root_attrs", {}).items():
        got = _attr(f, name)
        if got is None or (bool(got) if isinstance(want, bool) else got) != want:
            return False
    for g in rule.get("groups", []):
        if not isinstance(f.get(g), h5py.Group):
            return False
    for d in rule.get("datasets", []):
        if not isinstance(f.get(d), h5py.Dataset):
            return False
    data_any = rule.get("data_attrs_any")
    suffix = rule.get("obs_suffix")
    if data_any or suffix:
        data = f.get(schema.episode_group)
        if not isinstance(data, h5py.Group):
            return False
        hit = bool(data_any) and any(a in data.attrs for a in data_any)
        if suffix and not hit:
            demos = [k for k in data if k.startswith(schema.episode_prefix)]
            if demos:
                obs = data[demos[0]].get("obs")
                hit = isinstance(obs, h5py.Group) and any(k.endswith(suffix) for k in obs)
            else:
                # An empty robomimic-style file is still robomimic-style (reported later).
                hit = schema.layout == "robomimic"
        if not hit:
            return False
    return True


def detect_layout(f: h5py.File, path: str | Path) -> str:
    """Names the layout of an open file.

    Raises:
        InputError: No known layout matches; the message lists what the file holds.
    """
    schemas = all_schemas()
    tag = _attr(f, "dynaflip_schema")
    if tag is not None:
        if tag not in schemas:
            raise InputError(path, "/@dynaflip_schema", repr(tag), "one of " + ", ".join(schemas))
        return str(tag)
    for name, schema in schemas.items():
        if name == "native":
            continue
        if _detect_one(f, schema):
            return name
    keys = sorted(f.keys())
    raise InputError(
        path,
        "/",
        f"top-level keys {keys[:8]}{'...' if len(keys) > 8 else ''} and no known layout",
        "a 'data' group of demo_N episodes (native, robomimic, LIBERO) or "
        "'action' + 'observations/' (ALOHA); or pass --layout",
    )


# --------------------------------------------------------------------------------------------
# Indexing


class _Checker:
    """Collects problems while checking an episode group against a schema."""

    def __init__(self, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems

    def add(self, key: str, found: str, expected: str) -> None:
        self.problems.append(Problem(self.path, key, found, expected))

    def dataset(
        self,
        group: h5py.Group,
        rel: str,
        spec: FieldSpec,
        bindings: dict[str, int],
    ) -> tuple[h5py.Dataset | None, dict[str, int]]:
        """Checks one dataset; returns it (or None) and the updated bindings."""
        key = _join(group.name, rel)
        obj = group.get(rel)
        if obj is None:
            if spec.required:
                self.add(key, "missing", f"a dataset {spec.describe_shape()} ({spec.name})")
            return None, bindings
        if not isinstance(obj, h5py.Dataset):
            self.add(key, f"a {type(obj).__name__}", f"a dataset ({spec.name})")
            return None, bindings
        if not dtype_kind_ok(obj.dtype, spec.dtypes):
            self.add(key, f"dtype {obj.dtype}", f"dtype {spec.describe_dtype()}")
            return None, bindings
        ok, new = match_shape(tuple(obj.shape), spec.shapes, bindings)
        if not ok:
            self.add(key, f"shape {tuple(obj.shape)}", f"shape {describe_bound(spec, bindings)}")
            return None, bindings
        return obj, new


def _join(group: str, rel: str) -> str:
    return (group.rstrip("/") + "/" + rel).replace("//", "/")


def _discover_cameras(group: h5py.Group, pattern: str) -> list[str]:
    head, tail = pattern.split("{camera}")
    parent_rel, _, prefix = head.rpartition("/")
    parent = group.get(parent_rel) if parent_rel else group
    if not isinstance(parent, h5py.Group):
        return []
    cams = []
    for k in parent:
        if k.startswith(prefix) and k.endswith(tail) and len(k) > len(prefix) + len(tail):
            cams.append(k[len(prefix) : len(k) - len(tail)])
    return cams


def _language(f: h5py.File, group: h5py.Group, schema: LayoutSchema) -> str | None:
    rule = schema.language
    if "episode_attr" in rule:
        v = _attr(group, rule["episode_attr"])
        if v:
            return str(v)
    if "file_attr" in rule:
        v = _attr(f, rule["file_attr"])
        if v:
            return str(v)
    data = f.get(schema.episode_group) if schema.episode_group else None
    if isinstance(data, h5py.Group):
        if "data_attr" in rule:
            v = _attr(data, rule["data_attr"])
            if v:
                return str(v)
        if "data_attr_json" in rule:
            attr, key = rule["data_attr_json"]
            raw = _attr(data, attr)
            if raw:
                try:
                    v = json.loads(raw).get(key)
                except (ValueError, AttributeError):
                    v = None
                if v:
                    return str(v)
    return None


def _index_episode(
    f: h5py.File,
    group: h5py.Group,
    name: str,
    schema: LayoutSchema,
    settings: SourceSettings,
    chk: _Checker,
) -> Episode | None:
    n_before = len(chk.problems)
    fields = schema.fields
    actions, b = chk.dataset(group, fields["actions"].path, fields["actions"], {})
    if actions is None:
        if not chk.problems[n_before:]:
            chk.add(_join(group.name, fields["actions"].path), "missing", "actions")
        return None
    T = b["T"]
    if T == 0:
        chk.add(actions.name, "a zero-length episode (0 frames)", "at least 2 frames")
        return None
    length_attr = schema.raw["episodes"].get("length_attr")
    if length_attr and length_attr in group.attrs:
        n = _attr(group, length_attr)
        if n != T:
            chk.add(f"{group.name}@{length_attr}", f"{n}", f"{T} (the length of actions)")

    cameras = _discover_cameras(group, schema.camera_pattern)
    if not cameras:
        chk.add(
            _join(group.name, schema.camera_pattern.replace("{camera}", "*")),
            "no camera images",
            "at least one camera",
        )
        return None
    cameras.sort(key=_natural_key)
    camera = settings.camera
    if camera is None:
        camera = next((c for c in schema.preferred_cameras if c in cameras), cameras[0])
    elif camera not in cameras:
        chk.add(
            _join(group.name, schema.camera_pattern.format(camera=camera)),
            f"no camera {camera!r}",
            "one of " + ", ".join(cameras),
        )
        return None

    paths: dict[str, str] = {"actions": actions.name}
    shapes: dict[str, tuple[int, ...]] = {"actions": tuple(actions.shape)}
    dtypes: dict[str, str] = {"actions": str(actions.dtype)}
    image_hw = (0, 0)
    for cam in cameras:
        cb = dict(b)
        for role, spec in fields.items():
            if not spec.per_camera:
                continue
            ds, cb = chk.dataset(group, spec.resolve(cam), spec, cb)
            if ds is None:
                continue
            if cam == camera:
                paths[role] = ds.name
                shapes[role] = tuple(ds.shape)
                dtypes[role] = str(ds.dtype)
                if role == "rgb" and spec.encoding != "jpeg":
                    image_hw = (int(ds.shape[1]), int(ds.shape[2]))
    for role, spec in fields.items():
        if spec.per_camera or role == "actions":
            continue
        ds, b = chk.dataset(group, spec.path, spec, b)
        if ds is not None:
            paths[role] = ds.name
            shapes[role] = tuple(ds.shape)

    jpeg_index = None
    if fields["rgb"].encoding == "jpeg" and "rgb" in paths:
        jpeg_index = cameras.index(camera)
        clen = group.get(fields["compress_len"].path)
        if isinstance(clen, h5py.Dataset) and "compress_len" in paths:
            if clen.shape[0] != len(cameras):
                chk.add(clen.name, f"{clen.shape[0]} rows", f"{len(cameras)} (one per camera)")
            else:
                image_hw = _jpeg_shape(f[paths["rgb"]], int(clen[jpeg_index, 0]), chk)

    # Proprio: the requested keys must exist; the layout's defaults are used when present.
    pspec = schema.proprio
    proprio_paths: list[str] = []
    proprio_dim = 0
    if pspec:
        wanted = settings.proprio_keys
        keys = list(wanted) if wanted is not None else list(pspec.get("keys", []))
        prop_field = FieldSpec(
            name="proprio",
            path="",
            dtypes=tuple(pspec.get("dtype", ["number"])),
            shapes=((("T", "*")), ("T",)),
            required=wanted is not None,
        )
        for k in keys:
            rel = pspec.get("prefix", "") + k
            ds, _ = chk.dataset(group, rel, prop_field, {"T": T})
            if ds is not None:
                proprio_paths.append(ds.name)
                proprio_dim += int(np.prod(ds.shape[1:])) if ds.ndim > 1 else 1

    language = _language(f, group, schema) or settings.language
    if schema.language.get("required") and not _language(f, group, schema):
        chk.add(
            f"{group.name}@{schema.language.get('episode_attr', 'language_instruction')}",
            "missing",
            "a language instruction (str)",
        )

    flows = _index_flows(group, schema, T, chk)
    if len(chk.problems) == n_before:
        _check_small_values(f, paths, proprio_paths, chk)
    if len(chk.problems) > n_before:
        return None
    orientation = settings.orientation or schema.settings.get("orientation", "none")
    depth_scale = settings.depth_scale
    if depth_scale is None:
        attr_scale = _attr(group, "depth_scale") or _attr(f, "depth_scale")
        depth_scale = (
            float(attr_scale) if attr_scale else float(schema.settings.get("depth_scale", 1.0))
        )
    return Episode(
        file=str(Path(f.filename).resolve()),
        group=group.name,
        name=name,
        layout=schema.layout,
        length=T,
        camera=camera,
        cameras=tuple(cameras),
        image_hw=image_hw,
        action_dim=int(actions.shape[1]),
        proprio_paths=tuple(proprio_paths),
        proprio_dim=proprio_dim,
        language=language,
        paths=paths,
        flows=flows,
        orientation=orientation,
        depth_scale=depth_scale,
        jpeg_index=jpeg_index,
        shapes=shapes,
        dtypes=dtypes,
    )


def _first_nonfinite(arr: np.ndarray) -> int | None:
    bad = ~np.isfinite(arr)
    return int(np.argwhere(bad)[0][0]) if bad.any() else None


def _check_small_values(
    f: h5py.File, paths: dict[str, str], proprio_paths: list[str], chk: _Checker
) -> None:
    """Value checks on arrays small enough to read whole while indexing (O(T) numbers)."""
    for path in [paths["actions"], *proprio_paths]:
        arr = np.asarray(f[path][()])
        if np.issubdtype(arr.dtype, np.floating):
            i = _first_nonfinite(arr)
            if i is not None:
                n = int((~np.isfinite(arr)).sum())
                chk.add(f"{path}[{i}]", f"{n} NaN/inf values", "finite values")
    if "intrinsics" in paths:
        K = np.asarray(f[paths["intrinsics"]][()], dtype=np.float64).reshape(-1, 3, 3)
        ok = (
            np.isfinite(K).all()
            and np.allclose(K[:, 2, :], [0.0, 0.0, 1.0], atol=1e-6)
            and (np.abs(K[:, 0, 0]) > 0).all()
            and (np.abs(K[:, 1, 1]) > 0).all()
        )
        if not ok:
            chk.add(
                paths["intrinsics"],
                f"K = {np.round(K[0], 4).tolist()}",
                "a pinhole K: finite, last row [0, 0, 1], nonzero fx and fy",
            )
    if "extrinsics" in paths:
        E = np.asarray(f[paths["extrinsics"]][()], dtype=np.float64).reshape(-1, 4, 4)
        if not np.isfinite(E).all():
            chk.add(paths["extrinsics"], "NaN/inf values", "finite camera-to-world transforms")
            return
        R = E[:, :3, :3]
        ortho = float(np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3)).max())
        last = float(np.abs(E[:, 3, :] - [0.0, 0.0, 0.0, 1.0]).max())
        if ortho > 1e-3 or last > 1e-6 or not (np.linalg.det(R) > 0).all():
            chk.add(
                paths["extrinsics"],
                f"a non-rigid transform (|R R^T - I| = {ortho:.3g}, last row off by {last:.3g})",
                "camera-to-world rigid transforms [R t; 0 0 0 1] with R a rotation",
            )


def _jpeg_shape(ds: h5py.Dataset, n: int, chk: _Checker) -> tuple[int, int]:
    import cv2

    buf = np.asarray(ds[0, :n], dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if n > 0 else None
    if img is None:
        chk.add(f"{ds.name}[0]", f"{n} bytes that do not decode as JPEG", "a JPEG image")
        return (0, 0)
    return (int(img.shape[0]), int(img.shape[1]))


def _index_flows(
    group: h5py.Group, schema: LayoutSchema, T: int, chk: _Checker
) -> tuple[FlowRef, ...]:
    spec = schema.raw.get("flow")
    if not spec:
        return ()
    root = group.get(spec["group"])
    if root is None:
        return ()
    if not isinstance(root, h5py.Group):
        chk.add(root.name, f"a {type(root).__name__}", "a group of flow/<source> groups")
        return ()
    out: list[FlowRef] = []
    # Names starting with "." are partial writes of an interrupted `flow extract`.
    sources = [k for k in root if not k.startswith(".")]
    for source in sorted(sources, key=lambda s: (not s.startswith("ground_truth"), s)):
        g = root[source]
        if not isinstance(g, h5py.Group):
            chk.add(g.name, "a dataset", "a group with points, delta, valid")
            continue
        stride = _attr(g, "stride")
        stride = 1 if stride is None else stride
        if not isinstance(stride, int) or not 1 <= stride < T:
            chk.add(f"{g.name}@stride", repr(stride), f"an integer in [1, {T - 1}]")
            continue
        b = {"T": T, "stride": stride}
        n_before = len(chk.problems)
        for fname, fspec in schema.flow_fields.items():
            _, b = chk.dataset(g, fname, fspec, b)
        if len(chk.problems) == n_before:
            out.append(
                FlowRef(
                    source=source,
                    group=g.name,
                    stride=stride,
                    num_points=b["P"],
                    frame=str(_attr(g, "frame") or "world"),
                )
            )
    return tuple(out)


def _check_file_attrs(f: h5py.File, schema: LayoutSchema, chk: _Checker) -> None:
    for name, rule in schema.file_attrs.items():
        v = _attr(f, name)
        if v is None:
            if rule.get("required"):
                chk.add(f"/@{name}", "missing", f"attribute {name} ({rule.get('type')})")
            continue
        if "const" in rule:
            want = rule["const"]
            got = bool(v) if isinstance(want, bool) else v
            if got != want:
                what = "a schema version" if "version" in name else f"attribute {name}"
                chk.add(f"/@{name}", repr(v), f"{what} {want!r}")


def index_file(
    path: str | Path, settings: SourceSettings, problems: list[Problem]
) -> LogFile | None:
    """Indexes one file, appending every problem found to `problems`.

    Returns:
        The `LogFile`, or ``None`` when the file cannot be used at all.
    """
    p = str(Path(path))
    chk = _Checker(p, problems)
    try:
        f = open_h5(path)
    except InputError as exc:
        problems.append(Problem(p, exc.key or "", exc.found, exc.expected))
        return None
    with f:
        try:
            return _index_open_file(f, p, settings, problems, chk)
        except (OSError, RuntimeError, KeyError) as exc:
            # h5py raises these on corrupt metadata met while walking the file (a damaged
            # B-tree, heap or link table).
            problems.append(
                Problem(
                    p, "/", f"corrupt HDF5 structure ({_short(str(exc))})", "a readable HDF5 file"
                )
            )
            return None


def _index_open_file(
    f: h5py.File, p: str, settings: SourceSettings, problems: list[Problem], chk: _Checker
) -> LogFile | None:
    try:
        layout = settings.layout or detect_layout(f, p)
    except InputError as exc:
        problems.append(Problem(p, exc.key or "", exc.found, exc.expected))
        return None
    schema = load_schema(layout)
    n_before = len(problems)
    _check_file_attrs(f, schema, chk)
    if len(problems) > n_before:
        return None
    episodes: list[Episode] = []
    if schema.file_per_episode:
        ep = _index_episode(f, f["/"], Path(p).stem, schema, settings, chk)
        if ep is not None:
            episodes.append(ep)
    else:
        data = f.get(schema.episode_group)
        if not isinstance(data, h5py.Group):
            chk.add(
                "/" + schema.episode_group,
                "missing" if data is None else "a dataset",
                f"a '{schema.episode_group}' group of {schema.episode_prefix}N episodes",
            )
            return None
        names = sorted((k for k in data if k.startswith(schema.episode_prefix)), key=_natural_key)
        if not names:
            chk.add(
                data.name,
                f"no episodes (keys: {sorted(data.keys())[:8]})",
                f"groups named {schema.episode_prefix}N",
            )
            return None
        for k in names:
            g = data[k]
            if not isinstance(g, h5py.Group):
                chk.add(g.name, "a dataset", "an episode group")
                continue
            ep = _index_episode(f, g, k, schema, settings, chk)
            if ep is not None:
                episodes.append(ep)
    attrs = {k: _attr(f, k) for k in f.attrs}
    return LogFile(p, layout, schema.schema_version, episodes, attrs)


def open_logs(
    paths: Sequence[str | Path] | str | Path,
    settings: SourceSettings | None = None,
) -> LogSet:
    """Opens site logs (files and/or folders) as one `LogSet`.

    Structure is checked on metadata only (no frame is read), so this is fast on large logs.

    Args:
        paths: Files or folders; folders are searched recursively for ``*.h5``/``*.hdf5``.
        settings: Per-source settings.

    Raises:
        InputError: The first problem found (the message says how many more there are).
    """
    settings = settings or SourceSettings()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = expand_paths(paths)
    problems: list[Problem] = []
    out: list[LogFile] = []
    for p in files:
        lf = index_file(p, settings, problems)
        if lf is not None:
            out.append(lf)
    if problems:
        first = problems[0].to_error()
        if len(problems) > 1:
            first.expected += f" (and {len(problems) - 1} more problems: run `data validate`)"
            first.args = (str(InputError(first.file, first.key, first.found, first.expected)),)
        raise first
    return LogSet(out)


# --------------------------------------------------------------------------------------------
# Reading


def orient_image(img: np.ndarray, orientation: str) -> np.ndarray:
    """Applies an orientation to (..., H, W[, C]) arrays; returns a contiguous copy or view."""
    if orientation == "none":
        return img
    h_axis = -3 if img.ndim >= 3 and img.shape[-1] in (1, 3, 4) else -2
    w_axis = h_axis + 1
    if orientation == "flip_vertical":
        return np.flip(img, axis=h_axis)
    if orientation == "flip_horizontal":
        return np.flip(img, axis=w_axis)
    return np.flip(img, axis=(h_axis, w_axis))


def orient_intrinsics(K: np.ndarray, hw: tuple[int, int], orientation: str) -> np.ndarray:
    """Adjusts K so that unprojecting an oriented pixel gives the same camera-frame point.

    A vertical flip maps row v to H-1-v, so (v - cy)/fy = (v' - (H-1-cy))/(-fy).
    """
    K = np.array(K, dtype=np.float64, copy=True)
    h, w = hw
    if orientation in ("flip_vertical", "rotate180"):
        K[..., 1, 1] *= -1.0
        K[..., 1, 2] = (h - 1) - K[..., 1, 2]
    if orientation in ("flip_horizontal", "rotate180"):
        K[..., 0, 0] *= -1.0
        K[..., 0, 2] = (w - 1) - K[..., 0, 2]
    return K


class EpisodeReader:
    """Reads frames of `Episode` records, keeping HDF5 files open lazily.

    Handles are opened on first use in the current process, so a reader can be pickled into
    DataLoader workers: each worker opens its own handles (h5py handles must not cross a fork).
    """

    MAX_OPEN_DATASETS = 48

    def __init__(self) -> None:
        self._files: dict[str, h5py.File] = {}
        self._datasets: OrderedDict[tuple[str, str], h5py.Dataset] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def close(self) -> None:
        """Closes every open handle."""
        for f in self._files.values():
            with contextlib.suppress(Exception):  # closing is best effort
                f.close()
        self._files.clear()
        self._datasets.clear()

    def file(self, path: str) -> h5py.File:
        """The open handle of a file (opened on first use in this process)."""
        if self._pid != os.getpid():
            self._files = {}
            self._datasets = OrderedDict()
            self._pid = os.getpid()
        f = self._files.get(path)
        if f is None:
            f = open_h5(path)
            self._files[path] = f
        return f

    def dataset(self, file: str, path: str) -> h5py.Dataset:
        """A dataset handle from a small LRU cache.

        Resolving an HDF5 path costs more than reading a 128x128 frame, so handles are reused;
        but each open dataset holds its own chunk cache (1 MiB), so the number kept open is
        bounded to keep memory independent of the number of episodes.
        """
        f = self.file(file)
        key = (file, path)
        ds = self._datasets.get(key)
        if ds is None:
            ds = f[path]
            self._datasets[key] = ds
            if len(self._datasets) > self.MAX_OPEN_DATASETS:
                self._datasets.popitem(last=False)
        else:
            self._datasets.move_to_end(key)
        return ds

    def _read(self, ep: Episode, role: str, index: Any) -> np.ndarray:
        path = ep.paths[role]
        try:
            return np.asarray(self.dataset(ep.file, path)[index])
        except (OSError, RuntimeError, KeyError) as exc:
            raise InputError(
                ep.file, f"{path}[{index}]", f"unreadable data ({_short(str(exc))})", "readable"
            ) from None

    def rgb(self, ep: Episode, t: int | slice) -> np.ndarray:
        """RGB frame(s) (…, H, W, 3) uint8, oriented."""
        if ep.jpeg_index is not None:
            return self._jpeg(ep, t)
        return orient_image(self._read(ep, "rgb", t), ep.orientation)

    def _jpeg(self, ep: Episode, t: int | slice) -> np.ndarray:
        import cv2

        ts = range(ep.length)[t] if isinstance(t, slice) else [t]
        frames = []
        clen = self.dataset(ep.file, ep.paths["compress_len"])
        data = self.dataset(ep.file, ep.paths["rgb"])
        for i in ts:
            n = int(clen[ep.jpeg_index, i])
            buf = np.asarray(data[i, :n], dtype=np.uint8)
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if n > 0 else None
            if img is None:
                raise InputError(
                    ep.file, f"{ep.paths['rgb']}[{i}]", f"{n} bytes that do not decode", "a JPEG"
                )
            # ACT encodes RGB arrays with cv2.imencode, so decoding returns them in RGB order.
            frames.append(orient_image(img, ep.orientation))
        return frames[0] if not isinstance(t, slice) else np.stack(frames)

    def depth(self, ep: Episode, t: int | slice) -> np.ndarray:
        """Depth (…, H, W) float32 in metres, oriented; 0 where invalid.

        Raises:
            InputError: NaN/inf or negative depth in the frame(s) read.
        """
        d = self._read(ep, "depth", t)
        if d.ndim >= 3 and d.shape[-1] == 1:
            d = d[..., 0]
        d = d.astype(np.float32) * np.float32(ep.depth_scale)
        if not np.isfinite(d).all():
            raise InputError(ep.file, f"{ep.paths['depth']}[{t}]", "NaN/inf depth", "finite")
        if (d < 0).any():
            raise InputError(
                ep.file, f"{ep.paths['depth']}[{t}]", f"negative depth ({d.min():.3g})", ">= 0"
            )
        return orient_image(d, ep.orientation)

    def intrinsics(self, ep: Episode, t: int) -> np.ndarray:
        """K (3, 3) float64 for frame t, adjusted for the orientation."""
        ds = self.dataset(ep.file, ep.paths["intrinsics"])
        K = np.asarray(ds[t] if ds.ndim == 3 else ds[()], dtype=np.float64)
        return orient_intrinsics(K, ep.image_hw, ep.orientation)

    def extrinsics(self, ep: Episode, t: int) -> np.ndarray:
        """Camera-to-world (4, 4) float64 for frame t."""
        ds = self.dataset(ep.file, ep.paths["extrinsics"])
        return np.asarray(ds[t] if ds.ndim == 3 else ds[()], dtype=np.float64)

    def actions(self, ep: Episode, t: int | slice) -> np.ndarray:
        """Actions float32."""
        return self._read(ep, "actions", t).astype(np.float32)

    def object_state(self, ep: Episode, t: int | slice) -> np.ndarray:
        """The simulator's true object state (…, D) float32 (``obs/object_state``: what the
        oracle reference head reads).

        Raises:
            InputError: The episode has none (not a simulator log).
        """
        if "object_state" not in ep.paths:
            raise InputError(
                ep.file,
                f"{ep.group}/obs/object_state",
                "missing",
                "logs from `sim generate` (the oracle head reads the true object positions)",
            )
        return self._read(ep, "object_state", t).astype(np.float32)

    def proprio(self, ep: Episode, t: int) -> np.ndarray:
        """The proprio vector (D,) float32 (concatenated keys), empty when none."""
        parts = [
            np.asarray(self.dataset(ep.file, p)[t], dtype=np.float32).reshape(-1)
            for p in ep.proprio_paths
        ]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def flow(
        self, ep: Episode, t: int, source: str | None = None, stride: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """3D flow of pair t: points (P, 3), delta (P, 3) float32 and valid (P,) bool."""
        ref = ep.flow(source, stride)
        if ref is None:
            raise InputError(ep.file, f"{ep.group}/flow", "no flow", "a flow/<source> group")
        return (
            np.asarray(self.dataset(ep.file, ref.group + "/points")[t], dtype=np.float32),
            np.asarray(self.dataset(ep.file, ref.group + "/delta")[t], dtype=np.float32),
            np.asarray(self.dataset(ep.file, ref.group + "/valid")[t]).astype(bool),
        )

    def flow_pixels(
        self, ep: Episode, source: str | None = None, stride: int | None = None
    ) -> np.ndarray | None:
        """Pixel (u, v) at frame t of each flow point, in the oriented image, when the points
        sit on a pixel grid (``flow/<source>/pixels``); None otherwise."""
        ref = ep.flow(source, stride)
        if ref is None or ep.orientation != "none":
            return None  # (pixels are stored for unrotated frames)
        f = self.file(ep.file)
        ds = f.get(ref.group + "/pixels")
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.shape[1] != 2:
            return None
        return np.asarray(ds[()], dtype=np.float32)


def summarize(logset: LogSet) -> list[dict[str, Any]]:
    """A JSON-ready summary per file (what `data inspect` shows)."""
    out = []
    for lf in logset.files:
        eps = lf.episodes
        first = eps[0] if eps else None
        langs = sorted({e.language for e in eps if e.language})
        flows = sorted({fr.source for e in eps for fr in e.flows})
        out.append(
            {
                "file": lf.path,
                "layout": lf.layout,
                "schema_version": lf.schema_version,
                "episodes": len(eps),
                "frames": sum(e.length for e in eps),
                "cameras": list(first.cameras) if first else [],
                "camera": first.camera if first else None,
                "image_hw": list(first.image_hw) if first else None,
                "shapes": {k: list(v) for k, v in first.shapes.items()} if first else {},
                "dtypes": dict(first.dtypes) if first else {},
                "action_dim": first.action_dim if first else None,
                "proprio_dim": first.proprio_dim if first else None,
                "orientation": first.orientation if first else None,
                "supervision": {
                    "language": all(e.has("language") for e in eps),
                    "depth": all(e.has("depth") for e in eps),
                    "intrinsics": all(e.has("intrinsics") for e in eps),
                    "extrinsics": all(e.has("extrinsics") for e in eps),
                    "flow": flows,
                },
                "instructions": langs[:20],
            }
        )
    return out
