"""Peak memory of converting a SAT checkpoint at the official width, relative to the checkpoint file's size.

Writes a random fp16 SAT folder with CogLM's real width (hidden 3072, the 150010-row embedding, 48 heads) but only a
few layers, then converts it with `conversion/convert_sat_checkpoint.py` in a fresh subprocess per output dtype and
reports that subprocess's peak RSS (Linux ``VmHWM``: anonymous memory plus the resident pages of memory-mapped files)
divided by the file size. ``--baseline-src`` runs the same conversion with another checkout's ``src`` folder too
(e.g. one extracted with ``git archive <commit> src``), side by side. Usage:

    python benchmarks/bench_conversion.py [--layers 3 --dtypes float16 bfloat16 float32 --baseline-src DIR --baseline-dtypes float16]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    if done.code:
        raise
with open("/proc/self/status") as status:  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's)
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def write_wide_checkpoint(folder: Path, layers: int, hidden: int, vocab: int, positions: int, heads: int) -> Path:
    """A SAT folder whose ``module`` holds random fp16 tensors of CogLM's shapes; returns the .pt path."""
    generator = torch.Generator().manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * 0.02).half()

    module = {"transformer.word_embeddings.weight": weight(vocab, hidden),
              "transformer.position_embeddings.weight": weight(positions, hidden),
              "transformer.final_layernorm.weight": torch.ones(hidden, dtype=torch.half),
              "transformer.final_layernorm.bias": torch.zeros(hidden, dtype=torch.half)}
    shapes = {"attention.query_key_value": (3 * hidden, hidden), "attention.dense": (hidden, hidden),
              "mlp.dense_h_to_4h": (4 * hidden, hidden), "mlp.dense_4h_to_h": (hidden, 4 * hidden)}
    for layer in range(layers):
        prefix = f"transformer.layers.{layer}."
        for name in ("input_layernorm", "post_attention_layernorm", "third_layernorm", "fourth_layernorm"):
            module[f"{prefix}{name}.weight"] = torch.ones(hidden, dtype=torch.half)
            module[f"{prefix}{name}.bias"] = torch.zeros(hidden, dtype=torch.half)
        for name, shape in shapes.items():
            module[f"{prefix}{name}.weight"] = weight(*shape)
            module[f"{prefix}{name}.bias"] = torch.zeros(shape[0], dtype=torch.half)
    (folder / "latest").write_text("432000")
    (folder / "model_config.json").write_text(json.dumps({
        "num_layers": layers, "hidden_size": hidden, "num_attention_heads": heads, "vocab_size": vocab,
        "max_sequence_length": positions, "inner_hidden_size": 4 * hidden, "layernorm_order": "sandwich"}))
    (folder / "432000").mkdir()
    path = folder / "432000" / "mp_rank_00_model_states.pt"
    torch.save({"module": module, "iteration": 432000}, path)
    return path


def peak_rss(src_dir: Path, *arguments: str) -> int:
    """Peak RSS in bytes of the conversion script run with ``arguments`` in a fresh interpreter that imports
    coglm_hf from ``src_dir``."""
    script = REPO_ROOT / "conversion" / "convert_sat_checkpoint.py"
    env = {**os.environ, "PYTHONPATH": str(src_dir), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", MEASURE, str(script), *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"conversion failed:\n{result.stderr[-3000:]}")
    return int(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=150010)
    parser.add_argument("--positions", type=int, default=1089)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--baseline-src", type=Path, help="a 'src' folder of another version to compare with")
    parser.add_argument("--baseline-dtypes", nargs="+", default=["float16"], help="output dtypes for the baseline")
    parser.add_argument("--workdir", type=Path, help="where to write the checkpoint (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "sat").mkdir()
        checkpoint = write_wide_checkpoint(tmp / "sat", args.layers, args.hidden, args.vocab, args.positions,
                                           args.heads)
        size = checkpoint.stat().st_size
        print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs, torch "
              f"{torch.__version__}")
        print(f"checkpoint: hidden {args.hidden}, vocab {args.vocab}, {args.layers} layers, fp16, "
              f"{size / 2**30:.2f} GiB on disk\n")
        versions = [("this version", REPO_ROOT / "src", args.dtypes)]
        if args.baseline_src:
            versions.insert(0, ("baseline", args.baseline_src.resolve(), args.baseline_dtypes))
        print("| version | output dtype | peak RSS GiB | peak RSS / file size | (peak − imports) / file size |")
        print("|---|---|---|---|---|")
        for label, src_dir, dtypes in versions:
            imports = peak_rss(src_dir, "--help")  # the interpreter with torch, transformers and coglm_hf loaded
            for dtype in dtypes:
                output = tmp / f"out-{label.replace(' ', '-')}-{dtype}"
                peak = peak_rss(src_dir, "--input", str(tmp / "sat"), "--output", str(output), "--dtype", dtype)
                print(f"| {label} | {dtype} | {peak / 2**30:.2f} | **{peak / size:.2f}×** | "
                      f"{(peak - imports) / size:.2f}× |", flush=True)
                subprocess.run(["rm", "-rf", str(output)], check=True)


if __name__ == "__main__":
    main()
