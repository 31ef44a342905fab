"""Produce the build output of this pure-Python (Triton) kernel: nothing is compiled, so it builds anywhere.

Writes the noarch variants ``kernels`` 0.17 selects by backend (the same files in each)::

    build/torch-cuda/   __init__.py  _triton_kernels.py  metadata.json
    build/torch-cpu/    (same; CPU tensors run only under Triton's interpreter, TRITON_INTERPRET=1)

Usage: ``python hub_kernels/cogview2-local-attention-triton/build_local.py [--out DIR]``. Each variant is written
to a staging directory and renamed into place, so a loader never sees a half-written variant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NAME = "cogview2-local-attention-triton"
PACKAGE = NAME.replace("-", "_")
BACKENDS = ("cuda", "cpu")


def sources() -> list[Path]:
    return sorted((ROOT / "torch-ext" / PACKAGE).glob("*.py"))


def kernel_id() -> str:
    """Unique module id per source content (``kernels`` registers the module under it)."""
    digest = hashlib.sha256()
    for path in sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"_{PACKAGE}_{digest.hexdigest()[:10]}"


def build(out_dir: Path, backends: tuple[str, ...] = BACKENDS) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    ident = kernel_id()
    variants = []
    for backend in backends:
        variant = out_dir / f"torch-{backend}"
        staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=out_dir))
        try:
            for src in sources():
                shutil.copy2(src, staging / src.name)
            metadata = {
                "name": NAME,
                "id": ident,
                "version": 1,
                "license": "Apache-2.0",
                "python-depends": [],  # triton ships with CUDA builds of torch
                "backend": {"type": backend},
            }
            (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
            if variant.exists():
                shutil.rmtree(variant)
            staging.rename(variant)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        variants.append(variant)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build", help="directory that receives the variants")
    args = parser.parse_args()
    for variant in build(args.out.resolve()):
        print(variant)


if __name__ == "__main__":
    main()
