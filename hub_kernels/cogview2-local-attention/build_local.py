"""Build this kernel for the local machine with ``torch.utils.cpp_extension`` (no Nix / kernel-builder needed).

Writes the variant directory ``kernels`` loads (``get_local_kernel(<kernel dir>)``, or ``LOCAL_KERNELS``)::

    build/torch<maj><min>-cxx11-<cpu|cu<maj><min>>-<arch>-linux/
        __init__.py  _ops.py  _cogview2_local_attention_<backend>_<hash>.so  metadata.json

Usage (needs a C++ compiler and ninja; the CUDA backend needs nvcc matching ``torch.version.cuda``)::

    python hub_kernels/cogview2-local-attention/build_local.py                # backend of the torch build
    python hub_kernels/cogview2-local-attention/build_local.py --backend cpu  # CPU variant only
    TORCH_CUDA_ARCH_LIST="9.0" python hub_kernels/cogview2-local-attention/build_local.py --backend cuda

The build runs in this process and loads the library once as a smoke test, so run it as a separate process
from code that later loads the kernel through ``kernels`` (one process cannot register the op namespace twice).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent
PACKAGE = "cogview2_local_attention"
NAME = "cogview2-local-attention"
SOURCES = {
    "cpu": ["csrc/local_attention_cpu.cpp", "torch-ext/torch_binding.cpp"],
    "cuda": ["csrc/local_attention_cpu.cpp", "csrc/local_attention_cuda.cu", "torch-ext/torch_binding.cpp"],
}
HEADERS = ["csrc/local_attention.h", "torch-ext/torch_binding.h", "build_support/registration.h"]


def variant_name(backend: str) -> str:
    """The arch variant ``kernels`` 0.17 selects for this torch build, e.g. ``torch213-cxx11-cpu-x86_64-linux``."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    abi = "cxx11" if torch.compiled_with_cxx11_abi() else "cxx98"
    if backend == "cuda":
        cuda_major, cuda_minor = torch.version.cuda.split(".")[:2]
        backend_tag = f"cu{cuda_major}{cuda_minor}"
    else:
        backend_tag = "cpu"
    return f"torch{major}{minor}-{abi}-{backend_tag}-{platform.machine()}-linux"


def cuda_archs() -> list[str]:
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if listed:
        return [a.strip() for a in listed.replace(";", " ").split() if a.strip()]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}"]
    raise SystemExit("no GPU visible: set TORCH_CUDA_ARCH_LIST (e.g. '9.0') to build the CUDA backend")


def build(backend: str, out_dir: Path, verbose: bool = False) -> Path:
    if sys.platform != "linux":
        raise SystemExit("build_local.py builds Linux variants only")
    if backend == "cuda" and (torch.version.cuda is None or cpp_extension.CUDA_HOME is None):
        raise SystemExit("the CUDA backend needs a CUDA build of torch and the CUDA toolkit (nvcc, CUDA_HOME)")
    sources = [ROOT / s for s in SOURCES[backend]]
    digest = hashlib.sha256(backend.encode())
    for path in sorted(sources + [ROOT / h for h in HEADERS] + sorted((ROOT / "torch-ext" / PACKAGE).glob("*.py"))):
        digest.update(path.read_bytes())
    ext_name = f"_{PACKAGE}_{backend}_{digest.hexdigest()[:10]}"

    macro = f"-D{backend.upper()}_KERNEL"
    cflags = ["-O3", "-std=c++17", "-fopenmp", macro]  # -fopenmp: ATen's parallel_for is OpenMP-inlined
    cuda_flags = ["-O3", "-std=c++17", macro, "--expt-relaxed-constexpr", "-lineinfo"]
    metadata_backend: dict[str, object] = {"type": backend}
    if backend == "cuda":
        archs = cuda_archs()
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs)
        metadata_backend["archs"] = archs

    with tempfile.TemporaryDirectory(prefix="cogview2_la_build_") as tmp:
        module = cpp_extension.load(
            name=ext_name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(ROOT / "build_support"), str(ROOT / "torch-ext"), str(ROOT / "csrc")],
            build_directory=tmp,
            with_cuda=backend == "cuda",
            verbose=verbose,
        )
        library = Path(module.__file__)
        assert hasattr(torch.ops, ext_name) and hasattr(getattr(torch.ops, ext_name), "forward"), "ops missing"

        variant = out_dir / variant_name(backend)
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging_", dir=out_dir))
        try:
            shutil.copy2(library, staging / f"{ext_name}.so")
            for src in (ROOT / "torch-ext" / PACKAGE).glob("*.py"):
                shutil.copy2(src, staging / src.name)
            (staging / "_ops.py").write_text(
                "import torch\n\n"
                f"from . import {ext_name}  # noqa: F401  (loads the library, registering its ops)\n\n"
                f"ops = torch.ops.{ext_name}\n\n\n"
                "def add_op_namespace_prefix(op_name: str) -> str:\n"
                f'    return f"{ext_name}::{{op_name}}"\n'
            )
            metadata = {
                "name": NAME,
                "id": ext_name,
                "version": 1,
                "license": "Apache-2.0",
                "python-depends": [],
                "backend": metadata_backend,
            }
            (staging / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
            if variant.exists():
                shutil.rmtree(variant)
            staging.rename(variant)  # atomic: a loader never sees a half-written variant
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["cpu", "cuda"], default="cuda" if torch.version.cuda else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "build", help="directory that receives the variant")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    variant = build(args.backend, args.out.resolve(), verbose=args.verbose)
    print(variant)


if __name__ == "__main__":
    main()
