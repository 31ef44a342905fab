"""Super-resolution: LoPAR vs raster-order autoregression, and direct-SR memory with the local op vs dense attention.

1. **LoPAR vs autoregression.** The iterative-SR model regenerates a 60×60 grid in 6 LoPAR passes (the official
   order matrix). The baseline generates the same 3600 tokens one by one in raster order with a KV cache, with the
   same weights (the iterative-SR state dict loaded into ``CogLMForMaskedRegions``: causal attention over everything
   before, which is what the paper's "3600 sequential steps" refers to). Reports forward passes and wall time.
   LoPAR computes logits only for the cells it regenerates (``masked_logits_only``).
2. **Direct-SR memory.** One hi-res attention call and one direct-SR backbone pass (embeddings + layers; the fp32
   logits are the same for every variant and left out) with the hi-res attention computed by ``local_attention_2d``
   (``torch`` backend, and the fused ``kernel`` backend when ``COGLM_LOCAL_ATTENTION_KERNEL_PATH`` or
   ``COGLM_LOCAL_ATTENTION_KERNEL`` names a build), by a dense masked SDPA over the concatenated [hi-res; low-res]
   keys, and by dense attention that materialises the scores. Peak memory: ``torch.cuda.max_memory_allocated`` on
   CUDA; on CPU the rise of the process peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident
   size before the call, in a child process whose glibc returns freed memory at once.

All models use random weights (seeded) of a small config. Usage:

    python benchmarks/bench_super_resolution.py [--hidden 256 --layers 4 --heads 4 --threads 1 --device cpu]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from coglm_hf import modeling_coglm_sr
from coglm_hf.configuration_coglm import CogLMDirectSRConfig, CogLMIterativeSRConfig
from coglm_hf.local_attention import local_attention_mask, set_local_attention_backend
from coglm_hf.modeling_coglm import CogLMForMaskedRegions
from coglm_hf.modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
from coglm_hf.sampling import LOPAR_TOP_K, lopar_regeneration_mask, top_k_sample

IDS = dict(vocab_size=20100, num_image_tokens=20000, text_token_offset=20000, boi_token_id=20090,
           start_of_english_token_id=20091, start_of_chinese_token_id=20092)


def sizes(args) -> dict:
    return dict(IDS, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                intermediate_size=4 * args.hidden)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------- 1. LoPAR vs AR
@torch.no_grad()
def lopar(model, text, tokens, generator):
    """6 LoPAR passes with the official per-pass top-k; returns (tokens, forward passes)."""
    grid = model.config.hires_grid_size
    current = tokens
    for index, top_k in enumerate(LOPAR_TOP_K):
        regenerate = lopar_regeneration_mask(grid, grid, index + 1).to(tokens.device).flatten()[None]
        masked = torch.where(regenerate, model.mask_token_id, current)
        logits = model(input_ids=text, image_tokens=masked, masked_logits_only=True).logits
        current = current.clone()
        current[regenerate.expand_as(current)] = top_k_sample(logits, top_k, generator=generator)
    return current, len(LOPAR_TOP_K)


@torch.no_grad()
def autoregressive(model, text, num_tokens, offset, generator):
    """Raster-order generation with a KV cache: text prefilled once, then one token per forward pass."""
    cache = DynamicCache(config=model.config)
    out = model(text, position_ids=torch.arange(text.shape[1], device=text.device), past_key_values=cache,
                use_cache=True, image_logits_only=True)
    tokens, passes = [], 1
    for step in range(num_tokens):
        token = top_k_sample(out.logits[:, -1], 40, generator=generator)[:, None]
        tokens.append(token)
        if step + 1 == num_tokens:
            break
        position = torch.tensor([offset + step], device=text.device)
        out = model(token, position_ids=position, past_key_values=cache, use_cache=True, image_logits_only=True)
        passes += 1
    return torch.cat(tokens, 1), passes


def bench_lopar_vs_ar(args, device) -> list[str]:
    torch.manual_seed(0)
    config = CogLMIterativeSRConfig(**sizes(args))
    itersr = CogLMForIterativeSuperResolution(config).to(device).eval()
    baseline = CogLMForMaskedRegions(config).to(device).eval()
    baseline.load_state_dict(itersr.state_dict())  # the same weights, full causal attention
    cells = config.num_hires_positions
    text = torch.randint(20000, 20090, (1, config.sr_text_slots), device=device)
    start = torch.randint(0, 20000, (1, cells), device=device)

    lopar(itersr, text, start, None)  # warm-up (allocator, local-attention caches)
    rows = []
    for name, run in (
        ("LoPAR (iterative SR, 6 passes)", lambda g: lopar(itersr, text, start, g)),
        ("raster autoregression, KV cache", lambda g: autoregressive(baseline, text, cells,
                                                                     config.hires_position_offset, g)),
    ):
        generator = torch.Generator(device=device).manual_seed(0)
        synchronize(device)
        began = time.perf_counter()
        tokens, passes = run(generator)
        synchronize(device)
        rows.append((name, passes, time.perf_counter() - began, tokens.shape[1]))
    lopar_s = rows[0][2]
    lines = ["| generation of 3600 tokens | forward passes | seconds | tokens/s | LoPAR speed-up |",
             "|---|---:|---:|---:|---:|"]
    for name, passes, seconds, count in rows:
        lines.append(f"| {name} | {passes} | {seconds:.2f} | {count / seconds:.0f} | {seconds / lopar_s:.1f}× |")
    return lines


# -------------------------------------------------------------------------------------------- 2. DSR memory
@functools.lru_cache(maxsize=4)
def dense_mask(grid, window, cross_grid, cross_window, device) -> torch.Tensor:
    """Bool [G², G² + g²] visibility over the concatenated [hi-res; low-res] keys, built once (not measured)."""
    return torch.cat([local_attention_mask(grid, window, device=device),
                      local_attention_mask(grid, cross_window, key_grid=cross_grid, device=device)], dim=1)


def dense_attention(materialise: bool):
    """The DSR hi-res attention as dense attention over all 4000 keys with a mask: masked SDPA, or the textbook
    form that materialises the score matrix."""

    def attention(query, key, value, *, grid, window, cross_key, cross_value, cross_grid, cross_window, scale):
        mask = dense_mask(tuple(grid), tuple(window), tuple(cross_grid), tuple(cross_window), query.device)
        keys, values = torch.cat([key, cross_key], dim=2), torch.cat([value, cross_value], dim=2)
        if not materialise:
            return F.scaled_dot_product_attention(query * scale, keys, values, attn_mask=mask, scale=1.0)
        scores = (query * scale) @ keys.transpose(-1, -2)
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ values

    return attention


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_peak(fn, device) -> tuple[float, torch.Tensor]:
    """(peak extra MiB, result) of one call (no timing: the fixed malloc thresholds on CPU distort it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, result
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    base = rss_kib("VmRSS")
    result = fn()
    return (rss_kib("VmHWM") - base) / 1024, result


def bench_dsr_memory(args, device) -> list[str]:
    torch.manual_seed(0)
    model = CogLMForDirectSuperResolution(CogLMDirectSRConfig(**sizes(args))).to(device).eval()
    text = torch.randint(20000, 20090, (args.batch, 20), device=device)
    low_res = torch.randint(0, 20000, (args.batch, 20, 20), device=device)
    layout = model.prepare_layout(text, None, low_res)

    def backbone():
        with torch.no_grad():
            return model.forward_layout(layout)[0]

    config, heads = model.config, args.heads
    shape = (args.batch, heads, config.num_hires_positions, config.head_dim)
    qkv = [torch.randn(shape, device=device) for _ in range(3)]
    cross = [torch.randn(args.batch, heads, config.num_image_positions, config.head_dim, device=device)
             for _ in range(2)]
    grid, low = (config.hires_grid_size,) * 2, (config.image_grid_size,) * 2

    def attention_call():
        with torch.no_grad():
            return modeling_coglm_sr.local_attention_2d(
                *qkv, grid=grid, window=config.local_window, cross_key=cross[0], cross_value=cross[1],
                cross_grid=low, cross_window=config.cross_window, scale=config.head_dim**-0.5,
            )

    variants = {  # name: (local-attention backend, replacement of the op)
        "local_attention_2d, torch backend": ("torch", None),
        "local_attention_2d, kernel backend": ("kernel", None),
        "dense masked SDPA over 4000 keys": ("torch", dense_attention(materialise=False)),
        "dense, materialised scores": ("torch", dense_attention(materialise=True)),
    }
    results = {}
    for name, (backend, replacement) in variants.items():
        try:
            set_local_attention_backend(backend)
        except RuntimeError as error:  # no kernel configured / loadable here
            print(f"({name}: skipped, {error})")
            continue
        swap = mock.patch.object(modeling_coglm_sr, "local_attention_2d", replacement) if replacement else nullcontext()
        with swap:
            backbone(), attention_call()  # warm-up (caches, allocator)
            results[name] = (measure_peak(attention_call, device), measure_peak(backbone, device))
    (local_op, local_op_out), (local_pass, local_pass_out) = next(iter(results.values()))
    dense_scores = args.batch * heads * config.num_hires_positions * 4000 * 4 / 2**20
    lines = [f"Dense fp32 score matrix of one layer: {args.batch}×{heads}×3600×4000 = {dense_scores:.0f} MiB.", "",
             "| hi-res attention of DSR | one attention call: peak extra MiB | vs local | DSR backbone pass: peak "
             "extra MiB | vs local | max abs diff vs local (call / pass) |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, ((op_mib, op_out), (pass_mib, pass_out)) in results.items():
        op_diff, pass_diff = (op_out - local_op_out).abs().max().item(), (pass_out - local_pass_out).abs().max().item()
        diffs = f"{op_diff:.1e} / {pass_diff:.1e}"
        lines.append(f"| {name} | {op_mib:.0f} | {op_mib / local_op:.1f}× | {pass_mib:.0f} | "
                     f"{pass_mib / local_pass:.1f}× | {diffs} |")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1, help="batch of the DSR memory pass")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument("--memory-only", action="store_true", help="only the DSR memory part")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_only:
        print("\n".join(bench_dsr_memory(args, device)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, device {device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, fp32, random weights")
    print()
    print("\n".join(bench_lopar_vs_ar(args, device)))
    print()
    if device.type == "cuda":
        print("\n".join(bench_dsr_memory(args, device)))
        return
    # CPU memory runs in a child process with fixed glibc thresholds: every block >= 64 KiB is mapped and returned
    # on free, so the resident size follows live memory (this slows allocation down, hence not for the timings)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    subprocess.run([sys.executable, *sys.argv, "--memory-only"], env=env, check=True)


if __name__ == "__main__":
    main()
