"""The log fingerprint depends on content only."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
from typer.testing import CliRunner

from dynaflip_adapt.cli.app import app
from dynaflip_adapt.data.fingerprint import logs_fingerprint
from tests.builders import write_native


def _rewrite(src, dst, **create_kw):
    """Copies every dataset and attribute with other storage options."""
    with h5py.File(src, "r") as a, h5py.File(dst, "w") as b:
        for k, v in a.attrs.items():
            b.attrs[k] = v

        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                g = b.require_group(name)
            else:
                kw = create_kw if obj.ndim >= 1 and obj.size > 1 else {}
                g = b.create_dataset(name, data=obj[()], **kw)
            for k, v in obj.attrs.items():
                g.attrs[k] = v

        a.visititems(visit)


def test_stable_under_rename_order_and_storage(tmp_path):
    a, _ = write_native(tmp_path / "a.h5", n=2)
    b, _ = write_native(tmp_path / "b.h5", n=1, language="push the block")
    base = logs_fingerprint([a, b])
    assert base.startswith("sha256:") and len(base) == 7 + 64
    assert logs_fingerprint([b, a]) == base
    renamed = tmp_path / "sub" / "zz.hdf5"
    renamed.parent.mkdir()
    shutil.copy(a, renamed)
    assert logs_fingerprint([renamed, b]) == base
    gz = tmp_path / "gz.h5"
    _rewrite(a, gz, compression="gzip", chunks=True)
    assert logs_fingerprint([gz, b]) == base


def test_changes_with_one_pixel_or_one_attribute(tmp_path):
    a, _ = write_native(tmp_path / "a.h5", n=2)
    base = logs_fingerprint([a])
    with h5py.File(a, "a") as f:
        f["data/demo_1/obs/agentview_image"][5, 0, 0, 0] ^= np.uint8(1)
    pixel = logs_fingerprint([a])
    assert pixel != base
    with h5py.File(a, "a") as f:
        f["data/demo_1/obs/agentview_image"][5, 0, 0, 0] ^= np.uint8(1)
    assert logs_fingerprint([a]) == base
    with h5py.File(a, "a") as f:
        f["data/demo_0"].attrs["language_instruction"] = "other"
    assert logs_fingerprint([a]) not in (base, pixel)


def test_cli_fingerprint_json(tmp_path):
    a, _ = write_native(tmp_path / "a.h5")
    r = CliRunner().invoke(app, ["data", "fingerprint", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.stdout)
    assert out["fingerprint"] == logs_fingerprint([a])
    assert list(out["files"]) == [str(a.resolve())]
