"""The user docs stand alone: no references to notes outside the repository, every repository path they name
exists, and the documented CPU smoke run (docs/training.md) runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
# section signs and the names of the reference notes kept outside the repository
OUTSIDE = re.compile(r"§|(?<![\w/])reference/|hf_notes|cogview2_reference\.md|local_attention\.md|style_notes|design\.md")
REPO_PATH = re.compile(r"`((?:docs|tests|src|benchmarks|conversion|hub_kernels|\.ci)/[^`\s:*<>]+)")
LINK = re.compile(r"\]\(([^)#\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_references_resolve_inside_the_repository(doc):
    text = doc.read_text(encoding="utf-8")
    outside = [line.strip() for line in text.splitlines() if OUTSIDE.search(line)]
    assert not outside, f"{doc.name} cites notes outside the repository: {outside}"
    missing = [path for path in REPO_PATH.findall(text) if not (REPO_ROOT / path.rstrip(".,;")).exists()]
    missing += [target for target in LINK.findall(text)
                if "://" not in target and not (doc.parent / target).exists()]
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def test_code_cites_no_notes_outside_the_repository():
    """Docstrings and comments state facts instead of pointing at sections of notes that are not shipped."""
    sources = [path for folder in ("src", "conversion", "benchmarks", "tests") for path in
               (REPO_ROOT / folder).rglob("*.py") if path.name != "test_docs.py"]
    found = [f"{path.relative_to(REPO_ROOT)}:{number}" for path in sources
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found, f"references to notes outside the repository: {found}"


def _blocks(doc: str, heading: str) -> list[tuple[str, str]]:
    """(language, code) of the fenced blocks under `heading`, up to the next heading."""
    text = (REPO_ROOT / doc).read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    section = re.split(r"\n#{1,4} ", section, maxsplit=1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


def test_training_smoke_run_and_back_into_a_pipeline_as_documented(tmp_path):
    """docs/training.md: export shapes scenes, build the cache, finetune the demo base model, put it back into a
    pipeline, generate with the CLI — the documented commands, verbatim, in a fresh folder."""
    smoke = _blocks("docs/training.md", "### CPU smoke run")
    back = _blocks("docs/training.md", "### Put a finetuned model back into a pipeline")
    assert [language for language, _ in smoke] == ["bash"] and [language for language, _ in back] == ["python", "bash"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = "set -euo pipefail\n" + smoke[0][1] + f"python - <<'PY'\n{back[0][1]}PY\n" + back[1][1]
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(list((tmp_path / "shapes-photos").glob("*.png"))) == 32
    assert (tmp_path / "shapes-cache" / "cache_info.json").is_file()
    assert (tmp_path / "smoke-run" / "model.safetensors").is_file()
    assert (tmp_path / "smoke-pipeline" / "pipeline_cogview2.py").is_file()
    assert [p.name for p in (tmp_path / "smoke-images").iterdir()] == ["00-a-red-star-on-a-white-background-0.png"]


def test_readme_python_example_runs_on_the_demo_model():
    """README: the demo pipeline from Python, as written (3 images, 240x240)."""
    [(language, code)] = [block for block in _blocks("README.md", "What it makes") if block[0] == "python"]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert [image.size for image in namespace["images"]] == [(240, 240)] * 3
