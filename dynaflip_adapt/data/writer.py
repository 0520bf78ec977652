"""Writing site logs: the native layout, and exports to the robomimic and ALOHA layouts.

Image datasets are chunked one frame per chunk so that random access by the streaming dataset
reads exactly one frame.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from dynaflip_adapt.errors import InputError
from dynaflip_adapt.outputs import ensure_room

NATIVE_SCHEMA_VERSION = 1
COMPRESSIONS = ("none", "gzip", "lzf")


@dataclass
class EpisodeData:
    """One episode in memory, in the canonical view.

    Attributes:
        rgb: (T, H, W, 3) uint8 per camera.
        actions: (T, A) float.
        language: Instruction.
        depth: (T, H, W) float32 metres per camera.
        intrinsics: (3, 3) or (T, 3, 3) per camera.
        extrinsics: (T, 4, 4) camera-to-world per camera.
        proprio: Low-dim observation arrays (T, ...) by key.
        flows: Source -> dict with points, delta (T-stride, P, 3), valid (T-stride, P), stride,
            and optional extra attrs.
        attrs: Extra episode attributes (e.g. site, seed).
    """

    rgb: dict[str, np.ndarray]
    actions: np.ndarray
    language: str
    depth: dict[str, np.ndarray] = field(default_factory=dict)
    intrinsics: dict[str, np.ndarray] = field(default_factory=dict)
    extrinsics: dict[str, np.ndarray] = field(default_factory=dict)
    proprio: dict[str, np.ndarray] = field(default_factory=dict)
    flows: dict[str, dict[str, Any]] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return int(self.actions.shape[0])

    def nbytes(self) -> int:
        """Bytes of its arrays as the native layout stores them, before compression."""

        def n(arr: Any, itemsize: int) -> int:
            return int(np.size(arr)) * itemsize

        total = n(self.actions, 4) + 2 * self.length
        total += sum(n(a, 1) for a in self.rgb.values()) + sum(n(a, 4) for a in self.depth.values())
        total += sum(n(a, 8) for a in (*self.intrinsics.values(), *self.extrinsics.values()))
        total += sum(n(a, 4) for a in self.proprio.values())
        return total + sum(flow_nbytes(flow) for flow in self.flows.values())


def flow_nbytes(flow: Mapping[str, Any]) -> int:
    """Bytes of one flow group's arrays as `write_flow_group` stores them, before compression:
    points, delta and pixels as float32, valid as bool."""
    floats = sum(int(np.size(flow[k])) for k in ("points", "delta", "pixels") if k in flow)
    return 4 * floats + int(np.size(flow["valid"]))


def _comp(compression: str) -> dict[str, Any]:
    if compression not in COMPRESSIONS:
        raise InputError(
            None, "compression", repr(compression), "one of " + ", ".join(COMPRESSIONS)
        )
    if compression == "none":
        return {}
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    return {"compression": "lzf"}


def _frames(g: h5py.Group, name: str, arr: np.ndarray, comp: dict[str, Any]) -> None:
    chunks = (1, *arr.shape[1:]) if arr.ndim >= 3 and arr.shape[0] > 0 else None
    g.create_dataset(name, data=arr, chunks=chunks, **(comp if chunks else {}))


def write_flow_group(
    ep_group: h5py.Group, source: str, flow: Mapping[str, Any], compression: str = "none"
) -> None:
    """Writes (or replaces) ``flow/<source>`` in an episode group."""
    comp = _comp(compression)
    root = ep_group.require_group("flow")
    if source in root:
        del root[source]
    g = root.create_group(source)
    for key in ("points", "delta"):
        _frames(g, key, np.asarray(flow[key], dtype=np.float32), comp)
    g.create_dataset("valid", data=np.asarray(flow["valid"], dtype=bool), **comp)
    if "pixels" in flow:
        g.create_dataset("pixels", data=np.asarray(flow["pixels"], dtype=np.float32))
    g.attrs["stride"] = int(flow.get("stride", 1))
    g.attrs["frame"] = str(flow.get("frame", "world"))
    for k, v in flow.get("attrs", {}).items():
        g.attrs[k] = v


class NativeWriter:
    """Writes episodes into a native-layout file, atomically (temp file + rename on close).

    Args:
        path: Destination file.
        compression: ``none``, ``gzip`` or ``lzf`` for frame datasets.
        env_args: Stored as ``data@env_args`` JSON (robomimic convention).
        attrs: Extra root attributes (site name, generator...).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        compression: str = "none",
        env_args: Mapping[str, Any] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._comp = _comp(compression)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = h5py.File(self._tmp, "w")
        self._f.attrs["dynaflip_schema"] = "native"
        self._f.attrs["dynaflip_schema_version"] = NATIVE_SCHEMA_VERSION
        for k, v in (attrs or {}).items():
            self._f.attrs[k] = v
        self._data = self._f.create_group("data")
        self._data.attrs["env_args"] = json.dumps(dict(env_args or {}))
        self._total = 0
        self._n = 0

    def add(self, ep: EpisodeData, name: str | None = None) -> str:
        """Appends an episode; returns its group name."""
        name = name or f"demo_{self._n}"
        ensure_room(self._tmp, ep.nbytes(), f"episode {name}", shown=self.path)
        g = self._data.create_group(name)
        T = ep.length
        g.attrs["num_samples"] = T
        g.attrs["language_instruction"] = ep.language
        for k, v in ep.attrs.items():
            g.attrs[k] = v
        g.create_dataset("actions", data=np.asarray(ep.actions, dtype=np.float32))
        obs = g.create_group("obs")
        for cam, arr in ep.rgb.items():
            _frames(obs, f"{cam}_image", np.asarray(arr, dtype=np.uint8), self._comp)
        for cam, arr in ep.depth.items():
            _frames(obs, f"{cam}_depth", np.asarray(arr, dtype=np.float32), self._comp)
        for cam, arr in ep.intrinsics.items():
            obs.create_dataset(f"{cam}_intrinsics", data=np.asarray(arr, dtype=np.float64))
        for cam, arr in ep.extrinsics.items():
            obs.create_dataset(f"{cam}_extrinsics", data=np.asarray(arr, dtype=np.float64))
        for key, arr in ep.proprio.items():
            obs.create_dataset(key, data=np.asarray(arr, dtype=np.float32))
        for source, flow in ep.flows.items():
            write_flow_group(g, source, flow, "none" if not self._comp else "lzf")
        g.create_dataset("dones", data=(np.arange(T) == T - 1).astype(np.uint8))
        self._total += T
        self._n += 1
        return name

    def close(self) -> Path:
        """Finishes the file and moves it into place."""
        self._data.attrs["total"] = self._total
        self._f.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drops the partial file."""
        try:
            self._f.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> NativeWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_robomimic(path: str | Path, episodes: list[EpisodeData]) -> Path:
    """Writes episodes in the robomimic layout: RGB, proprio, actions, ``next_obs``, a mask.

    Depth, K, extrinsics, flow and language are not part of robomimic and are left out, so files
    written here exercise the reader's handling of logs without that supervision.
    """
    path = Path(path)
    # obs and next_obs: each episode's frames and proprio twice.
    ensure_room(path, 2 * sum(ep.nbytes() for ep in episodes), f"{len(episodes)} episodes")
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for i, ep in enumerate(episodes):
            g = data.create_group(f"demo_{i}")
            T = ep.length
            g.attrs["num_samples"] = T
            g.create_dataset("actions", data=np.asarray(ep.actions, dtype=np.float64))
            g.create_dataset("rewards", data=np.zeros(T, np.float64))
            g.create_dataset("dones", data=(np.arange(T) == T - 1).astype(np.int64))
            for group_name, shift in (("obs", 0), ("next_obs", 1)):
                obs = g.create_group(group_name)
                idx = np.minimum(np.arange(T) + shift, T - 1)
                for cam, arr in ep.rgb.items():
                    obs.create_dataset(f"{cam}_image", data=np.asarray(arr)[idx], chunks=True)
                for key, arr in ep.proprio.items():
                    obs.create_dataset(key, data=np.asarray(arr, dtype=np.float64)[idx])
            total += T
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps({"env_name": "dynaflip_sim", "type": 1})
        mask = f.create_group("mask")
        names = np.array([f"demo_{i}".encode() for i in range(len(episodes))], dtype="S")
        mask.create_dataset("train", data=names)
    return path


def write_aloha(
    folder: str | Path,
    episodes: list[EpisodeData],
    *,
    jpeg_quality: int | None = None,
    qpos_key: str | None = None,
) -> list[Path]:
    """Writes one ALOHA/ACT file per episode (``episode_N.hdf5``).

    Args:
        folder: Output folder.
        episodes: Episodes to write.
        jpeg_quality: When set, writes the compressed variant (padded JPEG bytes + compress_len).
        qpos_key: Proprio key written as ``/observations/qpos`` (default: the first one).
    """
    import cv2

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, ep in enumerate(episodes):
        p = folder / f"episode_{i}.hdf5"
        T = ep.length
        key = qpos_key or next(iter(ep.proprio), None)
        qpos = (
            np.asarray(ep.proprio[key], np.float64).reshape(T, -1)
            if key
            else np.zeros((T, 1), np.float64)
        )
        ensure_room(p, ep.nbytes(), "the episode")
        with h5py.File(p, "w") as f:
            f.attrs["sim"] = True
            if ep.language:
                f.attrs["language_instruction"] = ep.language
            obs = f.create_group("observations")
            images = obs.create_group("images")
            obs.create_dataset("qpos", data=qpos)
            obs.create_dataset("qvel", data=np.zeros_like(qpos))
            f.create_dataset("action", data=np.asarray(ep.actions, np.float64))
            cams = sorted(ep.rgb)
            if jpeg_quality is None:
                for cam in cams:
                    images.create_dataset(cam, data=ep.rgb[cam], chunks=(1, *ep.rgb[cam].shape[1:]))
            else:
                f.attrs["compress"] = True
                encoded = {
                    cam: [
                        cv2.imencode(".jpg", fr, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])[1]
                        for fr in ep.rgb[cam]
                    ]
                    for cam in cams
                }
                L = max(len(b) for bufs in encoded.values() for b in bufs)
                clen = np.zeros((len(cams), T), np.int64)
                for ci, cam in enumerate(cams):
                    padded = np.zeros((T, L), np.uint8)
                    for t, b in enumerate(encoded[cam]):
                        padded[t, : len(b)] = b.reshape(-1)
                        clen[ci, t] = len(b)
                    images.create_dataset(cam, data=padded, chunks=(1, L))
                f.create_dataset("compress_len", data=clen)
        out.append(p)
    return out
