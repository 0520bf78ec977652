"""Export: the adapter merged into the image encoder, as a standalone image-only encoder.

Formats:
- ``safetensors``: ``encoder.safetensors`` + ``model.py`` (a verbatim copy of the plain-torch ViT
  definition) + ``config.json``; ``model.load(folder)`` rebuilds it with torch alone.
- ``torchscript``: ``encoder.ts`` (``torch.jit.load``).
- ``onnx``: ``encoder.onnx`` (needs the ``onnx`` package to write).

Every export has ``preprocessing.json`` and ``manifest.json`` (sha256 of every file, and which
adapter version of which registry it came from), and is verified: merged vs unmerged (PEFT)
features, and the exported file vs the merged module. It is staged beside the destination and
moved in only when verified; `dynaflip_adapt.outputs` decides what may be replaced there.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dynaflip_adapt.errors import InputError, RuntimeFailure
from dynaflip_adapt.models import vit as vit_module
from dynaflip_adapt.models.adapter import Adapter
from dynaflip_adapt.models.backbone import Bundle
from dynaflip_adapt.outputs import (
    EXPORT_KIND,
    ExportTarget,
    check_export_folder,
    install_export,
    sha256_file,
    writing,
)

FORMATS = ("safetensors", "torchscript", "onnx")

_LOADER = '''

def load(folder):
    """Rebuilds the exported encoder from this folder (torch + safetensors only)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    keys = ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio")
    model = VisionTransformer(*(cfg[k] for k in keys))
    model.load_state_dict(load_file(str(folder / "encoder.safetensors")))
    return model.eval()
'''


@dataclass
class ExportResult:
    folder: Path
    format: str
    files: list[str]
    merged_vs_unmerged_max_abs: float
    export_vs_merged_max_abs: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d


def _example(bundle: Bundle, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = bundle.model.cfg.image_size
    return torch.randn(batch, 3, s, s, generator=g)


def check_format(fmt: str) -> None:
    """Raises InputError for an unknown export format (or ONNX without the onnx package)."""
    if fmt not in FORMATS:
        raise InputError(None, "--format", repr(fmt), "one of " + ", ".join(FORMATS))
    if fmt == "onnx":
        import importlib.util

        if importlib.util.find_spec("onnx") is None:
            raise InputError(None, "--format onnx", "no onnx package", "pip install onnx")


def export_encoder(
    bundle: Bundle,
    adapter: Adapter | None,
    out: str | Path | ExportTarget,
    fmt: str,
    *,
    overwrite: bool = False,
    source: dict[str, Any] | None = None,
) -> ExportResult:
    """Writes the merged encoder in `fmt` to `out` and verifies it.

    Args:
        bundle: The base backbone.
        adapter: The adapter to merge (None: the bare base encoder).
        out: The export folder (checked by `check_export_folder` unless already checked).
        fmt: One of `FORMATS`.
        overwrite: Replace the files a previous export in `out` wrote (never other files).
        source: Where the adapter came from, for the manifest (e.g. registered model, version
            and tracking URI).

    Raises:
        InputError: Unknown format, ONNX without the onnx package, or an output folder that
            must not be written (see `dynaflip_adapt.outputs`).
        RuntimeFailure: The export does not reproduce the merged encoder.
    """
    check_format(fmt)
    target = out if isinstance(out, ExportTarget) else check_export_folder(out, overwrite=overwrite)
    x = _example(bundle)
    if adapter is not None:
        merged = adapter.merged().eval()
        with torch.no_grad():
            diff_merge = float((adapter.peft_model(x) - merged(x)).abs().max())
    else:
        merged = copy.deepcopy(bundle.model.image).eval()
        diff_merge = 0.0
    target.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.path.parent, prefix=f".{target.path.name}.tmp-"))
    try:
        with writing(target.path, f"the {fmt} export", after="the folder is left as it was"):
            written = _write(bundle, adapter, merged, diff_merge, x, tmp, fmt, source)
            diff_export = verify_standalone(tmp, fmt, x, merged)
            files = install_export(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert sorted(files) == sorted(written)
    return ExportResult(target.path, fmt, sorted(files), diff_merge, diff_export)


def _write(
    bundle: Bundle,
    adapter: Adapter | None,
    merged: nn.Module,
    diff_merge: float,
    x: torch.Tensor,
    tmp: Path,
    fmt: str,
    source: dict[str, Any] | None,
) -> list[str]:
    """Writes the export's files into `tmp`; returns their names."""
    cfg = bundle.model.cfg
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in merged.state_dict().items()},
            str(tmp / "encoder.safetensors"),
        )
        (tmp / "model.py").write_text(Path(vit_module.__file__).read_text() + _LOADER)
        arch = {
            k: getattr(cfg, k)
            for k in ("image_size", "patch_size", "width", "depth", "heads", "mlp_ratio")
        }
        (tmp / "config.json").write_text(json.dumps(arch, indent=2))
    elif fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(merged, x)
        torch.jit.save(traced, str(tmp / "encoder.ts"))
    else:
        torch.onnx.export(
            merged,
            (x,),
            str(tmp / "encoder.onnx"),
            input_names=["image"],
            output_names=["features"],
            dynamic_axes={"image": {0: "batch"}, "features": {0: "batch"}},
            dynamo=False,
        )
    (tmp / "preprocessing.json").write_text(json.dumps(cfg.preprocessing(), indent=2))
    manifest = {
        "kind": EXPORT_KIND,
        "format": fmt,
        "feature_dim": cfg.width,
        "base_fingerprint": bundle.fingerprint,
        "adapter": _adapter_record(adapter, source) if adapter else None,
        "merged_vs_unmerged_max_abs": diff_merge,
        "files": {p.name: "sha256:" + sha256_file(p) for p in sorted(tmp.iterdir())},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    return sorted(p.name for p in tmp.iterdir())


def _adapter_record(adapter: Adapter, source: dict[str, Any] | None) -> dict[str, Any]:
    """What the export manifest says about the adapter: which version of which registry (or
    which folder), its site and lineage fingerprints; never a local cache path."""
    m = adapter.manifest
    lin = m.get("lineage", {})
    keep = ("base_fingerprint", "base_version", "data_fingerprint", "recipe_hash", "steps")
    return {
        **(source or {"folder": str(Path(adapter.path).resolve())}),
        "site": m.get("site"),
        "strength": float(lin.get("strength", 1.0)),
        **{k: lin.get(k) for k in keep if k in lin},
    }


_RUNNER = textwrap.dedent(
    """
    import sys
    # Prove the export needs neither dynaflip-adapt nor peft: make them unimportable.
    for name in ("dynaflip_adapt", "peft", "transformers"):
        sys.modules[name] = None
    import torch
    folder, fmt, inp, outp = sys.argv[1:5]
    x = torch.load(inp)
    if fmt == "safetensors":
        sys.path.insert(0, folder)
        import model
        enc = model.load(folder)
        with torch.no_grad():
            y = enc(x)
    elif fmt == "torchscript":
        enc = torch.jit.load(folder + "/encoder.ts")
        with torch.no_grad():
            y = enc(x)
    else:
        import onnxruntime as ort
        sess = ort.InferenceSession(folder + "/encoder.onnx")
        y = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    torch.save(y, outp)
    """
)


def verify_standalone(folder: Path, fmt: str, x: torch.Tensor, merged: nn.Module) -> float:
    """Runs the export in a clean subprocess (dynaflip-adapt and peft blocked); returns the max
    abs difference to the merged module. ONNX is checked only when onnxruntime is installed.

    Raises:
        RuntimeFailure: The export fails to load/run, or its output differs.
    """
    if fmt == "onnx":
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is None:
            return float("nan")
    inp, outp = folder / ".x.pt", folder / ".y.pt"
    torch.save(x, inp)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, str(folder), fmt, str(inp), str(outp)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=str(folder),
        )
        if proc.returncode != 0:
            raise RuntimeFailure(
                f"{folder}: the {fmt} export does not run standalone: "
                f"{proc.stderr.strip().splitlines()[-1:]}"
            )
        y = torch.load(outp)
    finally:
        inp.unlink(missing_ok=True)
        outp.unlink(missing_ok=True)
    with torch.no_grad():
        diff = float((y - merged(x)).abs().max())
    if not diff < 1e-3:
        raise RuntimeFailure(
            f"{folder}: the {fmt} export differs from the merged encoder by {diff:.3g}"
        )
    return diff
