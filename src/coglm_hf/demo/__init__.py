"""The embedded demo: a small CogView2 family trained by this project on the procedural "shapes" world.

    >>> from coglm_hf.demo import default_model_path
    >>> from coglm_hf.pipeline_cogview2 import CogView2Pipeline
    >>> pipe = CogView2Pipeline.from_pretrained(default_model_path())
    >>> image = pipe("a yellow circle on a black background").images[0]

`shapes` (the world and its captions), `judge` (a deterministic judge of it), `evaluate` (`coglm-hf evaluate`),
`train_demo` (the one command that trains the whole family).
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"


def default_model_path() -> Path:
    """Folder of the embedded demo pipeline (shipped inside the package; no download).

    Raises:
        FileNotFoundError: the package was installed without its weights (e.g. a build that dropped package data).
    """
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded demo model is missing from {WEIGHTS_DIR}; reinstall coglm-hf with its package data, or "
            "train it with `python -m coglm_hf.demo.train_demo --output <folder>` and pass --model <folder>"
        )
    return WEIGHTS_DIR


__all__ = ["WEIGHTS_DIR", "default_model_path"]
