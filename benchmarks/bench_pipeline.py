"""Per-stage time and forward-pass counts of a full CogView2Pipeline text→image run on a small config.

The real grids and windows (20×20 → 60×60, 9×5 / 5×5 windows, the real 20000-id image vocabulary and 500-cluster
table shape) with a narrow random backbone and a narrow random image tokenizer, so the numbers show where the time of
a run goes (sampling, SR layouts, decoding) rather than how fast a 6B model is. Usage:

    python benchmarks/bench_pipeline.py [--hidden 64 --layers 2 --heads 4 --images 4 --candidates 8 --threads 1]

Prints a Markdown table (the section of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import functools
import platform
import time

import torch

from coglm_hf import CogLMConfig, CogLMDirectSRConfig, CogLMForMaskedRegions, CogLMIterativeSRConfig, CogView2Scheduler
from coglm_hf.modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
from coglm_hf.modeling_icevq import IceVQModel
from coglm_hf.pipeline_cogview2 import CogView2Pipeline

STAGES = {
    "generate_stage1": "stage 1 (cached, cluster sampling)",
    "select_candidates": "post-selection (caption scores)",
    "direct_super_resolution": "direct super-resolution",
    "iterative_super_resolution": "iterative super-resolution (6 LoPAR passes)",
    "decode": "VQ decoding (60×60 → 480×480)",
}


def build(args) -> CogView2Pipeline:
    torch.manual_seed(0)
    common = dict(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  intermediate_size=4 * args.hidden)
    base = CogLMForMaskedRegions(CogLMConfig(**common)).eval()
    dsr = CogLMForDirectSuperResolution(CogLMDirectSRConfig(**common)).eval()
    itersr = CogLMForIterativeSuperResolution(CogLMIterativeSRConfig(**common)).eval()
    vq = IceVQModel(channels=args.vq_channels, z_channels=args.vq_channels, embedding_dim=args.vq_channels,
                    attn_resolutions=()).eval()
    labels = torch.randint(0, 500, (20000,), generator=torch.Generator().manual_seed(0))
    labels[:500] = torch.arange(500)  # every cluster non-empty, as in the official table
    pipe = CogView2Pipeline(tokenizer=None, image_tokenizer=vq, base_model=base, dsr_model=dsr, itersr_model=itersr,
                            scheduler=CogView2Scheduler(cluster_labels=labels.tolist()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def instrument(pipe: CogView2Pipeline) -> tuple[dict, dict]:
    """Wrap the stage methods with timers and count forward passes of every model."""
    seconds, passes = dict.fromkeys(STAGES, 0.0), {"base_model": 0, "scoring": 0, "dsr_model": 0, "itersr_model": 0,
                                                    "image_tokenizer": 0}
    for name in STAGES:
        method = getattr(pipe, name)

        @functools.wraps(method)
        def timed(*a, _method=method, _name=name, **k):
            start = time.perf_counter()
            result = _method(*a, **k)
            seconds[_name] += time.perf_counter() - start
            return result

        setattr(pipe, name, timed)

    def count(key):
        def hook(*_):
            passes[key] += 1

        return hook

    pipe.base_model.register_forward_pre_hook(count("base_model"))
    pipe.base_model.transformer.register_forward_pre_hook(count("scoring"))  # also runs inside base_model.forward
    pipe.dsr_model.register_forward_pre_hook(count("dsr_model"))
    pipe.itersr_model.register_forward_pre_hook(count("itersr_model"))
    for decoder in pipe.image_tokenizer.decs:
        decoder.register_forward_pre_hook(count("image_tokenizer"))
    return seconds, passes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vq-channels", type=int, default=32)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--candidates", type=int, default=8, help="post-selection candidates (0 = none)")
    parser.add_argument("--text", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = build(args)
    prompt_ids = torch.randint(20000, 150000, (args.text,), generator=torch.Generator().manual_seed(1)).tolist()
    pipe(prompt_ids=prompt_ids, only_first_stage=True, output_type="tokens", top_k_clusters=1)  # warm-up
    seconds, passes = instrument(pipe)
    start = time.perf_counter()
    out = pipe(prompt_ids=prompt_ids, num_images_per_prompt=args.images, num_candidates=args.candidates or None,
               generator=torch.Generator().manual_seed(0), output_type="np")
    total = time.perf_counter() - start
    assert out.images.shape == (args.images, 480, 480, 3)

    candidates = args.candidates or args.images
    stage1_steps = passes["base_model"]
    counts = {
        "generate_stage1": f"{stage1_steps} base (1 prompt encoding + {stage1_steps - 1} one-token steps)",
        "select_candidates": f"{passes['scoring'] - stage1_steps} base (caption scoring)",
        "direct_super_resolution": f"{passes['dsr_model']} DSR",
        "iterative_super_resolution": f"{passes['itersr_model']} iterative SR",
        "decode": f"{passes['image_tokenizer']} decoder",
    }
    print(f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s). Config: hidden {args.hidden}, {args.layers} layers, {args.heads} "
          f"heads, 20000 image ids, VQ width {args.vq_channels}; {args.text}-token prompt, {candidates} stage-1 "
          f"candidates → {args.images} images (stage-1 chunks of 8, SR chunks of 4).\n")
    print("| stage | forward passes | seconds | share |")
    print("|---|---|---:|---:|")
    for name, label in STAGES.items():
        if name == "select_candidates" and not args.candidates:
            continue
        print(f"| {label} | {counts[name]} | {seconds[name]:.2f} | {100 * seconds[name] / total:.0f} % |")
    print(f"| **total** | | **{total:.2f}** | |")
    per_token = seconds["generate_stage1"] / max(stage1_steps - 1, 1) * 1000
    print(f"\nStage 1: {per_token:.1f} ms per step for a batch of {min(candidates, 8)}.")


if __name__ == "__main__":
    main()
