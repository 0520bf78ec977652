"""A stable content fingerprint of a set of site logs, for lineage.

The fingerprint hashes what the files hold (every dataset's path, dtype, shape and bytes, and
every attribute), not how HDF5 laid it out on disk: rewriting a file with other chunking or
compression, renaming it, or listing files in another order gives the same fingerprint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dynaflip_adapt.data.logs import expand_paths, iter_blocks, open_h5

_BLOCK_BYTES = 32 << 20


def _attr_bytes(obj: h5py.HLObject) -> bytes:
    parts = []
    for k in sorted(obj.attrs):
        v: Any = obj.attrs[k]
        if isinstance(v, np.ndarray):
            v = v.tolist()
        elif isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        parts.append(f"{k}={v!r}")
    return "\n".join(parts).encode()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of one file's logical content (hex)."""
    h = hashlib.sha256()
    with open_h5(path) as f:
        h.update(b"/@" + _attr_bytes(f))
        names: list[str] = []
        f.visit(names.append)
        for name in sorted(names):
            obj = f[name]
            h.update(f"\n{name}@".encode() + _attr_bytes(obj))
            if not isinstance(obj, h5py.Dataset):
                continue
            h.update(f"|{obj.dtype.str}|{obj.shape}".encode())
            for _, block in iter_blocks(obj, _BLOCK_BYTES):
                h.update(block.tobytes())
    return h.hexdigest()


def logs_fingerprint(paths: Sequence[str | Path]) -> str:
    """Order- and name-independent fingerprint of a set of files and folders (``sha256:...``)."""
    digests = sorted(file_fingerprint(p) for p in expand_paths(paths))
    h = hashlib.sha256("\n".join(digests).encode())
    return "sha256:" + h.hexdigest()
