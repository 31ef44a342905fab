"""Full-width CogView2 timings for the lent GPU machine (and a CPU dry run of the same code with tiny models).

Parts (``--part``), each written as Markdown to stdout and as JSON to ``--json``:

* ``stage1``: a random-init CogLM at full width (hidden 3072, 48 layers, 48 heads: ~6B parameters, ~12 GB in
  bf16) generates 400 image tokens for a batch of 8 after a 17-token prompt, greedy, (a) with the dynamic KV cache
  in eager mode, (b) with a static KV cache and the one-token step compiled (``torch.compile`` with the options of
  ``CogView2Pipeline.set_stage1_decoding("static", compile=True, mode="reduce-overhead")``: CUDA graphs).
  Both must give the same tokens. The weight-bandwidth bound is one read of all weights per step at the device's
  memory bandwidth (``--bandwidth-tbps``, default from the device name).
* ``pipeline``: a full-width random-init pipeline (base + direct SR + iterative SR; small VQ decoder) on the GPU
  makes one image; per-stage seconds give one DSR pass and one LoPAR pass (of the 6); peak GPU memory.
* ``offload``: the same pipeline with ``enable_model_cpu_offload()`` (models on the CPU, each moved to the GPU for
  its stage); peak GPU memory of one image.

``--dry-run`` runs every part on the CPU with tiny models (hidden 64, 2 layers, 8 tokens), compiles nothing and
skips what needs an accelerator, saying why; a test runs it so that this script keeps working.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch
from transformers import DynamicCache, StaticCache

from coglm_hf import (
    CogLMConfig,
    CogLMDirectSRConfig,
    CogLMForDirectSuperResolution,
    CogLMForIterativeSuperResolution,
    CogLMForMaskedRegions,
    CogLMIterativeSRConfig,
    CogView2Pipeline,
    CogView2Scheduler,
    IceVQModel,
)
from coglm_hf.attention_masks import text_to_image_position_ids, text_to_image_regions

FULL = dict(hidden=3072, layers=48, heads=48, tokens=400, batch=8, text=16)
TINY = dict(hidden=64, layers=2, heads=4, tokens=8, batch=2, text=16)
BANDWIDTH_TBPS = {"H100": 3.35, "H200": 4.8}  # HBM3 / HBM3e, SXM parts


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def common_config(size: dict) -> dict:
    return dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                intermediate_size=4 * size["hidden"])  # fmt: skip


def build_model(cls, config, device: torch.device, dtype: torch.dtype):
    """Random init directly on ``device`` in ``dtype`` (a 6B model never exists in float32 or on the host)."""
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        return cls(config).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode(model, prompt: torch.Tensor, num_tokens: int, cache, step=None) -> torch.Tensor:
    """Greedy stage-1 decoding: prompt once, then one token per step (``step`` replaces the model call)."""
    text_length = prompt.shape[1] - 1
    positions = text_to_image_position_ids(text_length, num_tokens, model.config.boi_position_id).to(prompt.device)
    regions = [text_to_image_regions(text_length, 0)] * prompt.shape[0]
    out = model(prompt, position_ids=positions[: text_length + 1], mask_regions=regions,
                past_key_values=cache, use_cache=True, image_logits_only=True)  # fmt: skip
    step = step or (lambda token, pos: model(token, position_ids=pos, past_key_values=cache, use_cache=True,
                                             image_logits_only=True).logits)  # fmt: skip
    logits, tokens = out.logits, []
    for i in range(num_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        if i + 1 == num_tokens:
            break
        t = text_length + 1 + i
        logits = step(token, positions[t : t + 1])
    return torch.cat(tokens, 1)


def part_stage1(args, size: dict, device: torch.device, dtype: torch.dtype) -> dict:
    config = CogLMConfig(**common_config(size))
    model = build_model(CogLMForMaskedRegions, config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    prompt = torch.cat([torch.randint(20000, 20090, (size["batch"], size["text"]), generator=gen),
                        torch.full((size["batch"], 1), config.boi_token_id)], 1).to(device)  # fmt: skip
    result = {"parameters": params, "weight_GB": weight_bytes / 1e9, "batch": size["batch"], "tokens": size["tokens"]}

    def timed(fn):
        synchronize(device)
        start = time.perf_counter()
        tokens = fn()
        synchronize(device)
        return time.perf_counter() - start, tokens

    decode(model, prompt, 2, DynamicCache(config=config))  # warm-up
    seconds, reference = timed(lambda: decode(model, prompt, size["tokens"], DynamicCache(config=config)))
    result["dynamic_eager_s"] = seconds
    result["dynamic_ms_per_step"] = 1e3 * seconds / size["tokens"]
    print(f"(dynamic cache, eager: {seconds:.3f} s; static cache + compile next)", flush=True)  # kept if cut off

    # One static cache for the warm-up and the timed run (reset in between): the compiled step and its CUDA graphs
    # keep addressing the same cache tensors.
    cache = StaticCache(config=config, max_cache_len=prompt.shape[1] + size["tokens"])
    step = None
    if args.dry_run:
        result["static_compiled"] = "skipped: the dry run compiles nothing (static cache checked eagerly)"
    else:
        # the options of CogView2Pipeline.set_stage1_decoding("static", compile=True, mode="reduce-overhead")
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)

        def step(token, pos):
            return compiled(token, position_ids=pos, past_key_values=cache, use_cache=True,
                            image_logits_only=True).logits  # fmt: skip

    def run_static():
        cache.reset()
        return decode(model, prompt, size["tokens"], cache, step)

    try:
        start = time.perf_counter()
        run_static()  # warm-up: compilation and CUDA graph capture
        result["static_warmup_s"] = time.perf_counter() - start
        seconds, tokens = timed(run_static)
        result["static_s"] = seconds
        result["static_ms_per_step"] = 1e3 * seconds / size["tokens"]
        result["static_same_tokens"] = bool(torch.equal(tokens, reference))
    except Exception as err:  # recorded, not fatal: the other timings still count
        result["static_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tbps = args.bandwidth_tbps or next((v for k, v in BANDWIDTH_TBPS.items() if k in name), None)
        if tbps:
            bound = weight_bytes / (tbps * 1e12) * size["tokens"]
            result["bandwidth_TBps"] = tbps
            result["weight_bound_s"] = bound
            result["dynamic_vs_bound"] = result["dynamic_eager_s"] / bound
            if "static_s" in result:
                result["static_vs_bound"] = result["static_s"] / bound
    return result


def build_pipeline(size: dict, device: torch.device, dtype: torch.dtype) -> CogView2Pipeline:
    common = common_config(size)
    base = build_model(CogLMForMaskedRegions, CogLMConfig(**common), device, dtype)
    dsr = build_model(CogLMForDirectSuperResolution, CogLMDirectSRConfig(**common), device, dtype)
    itersr = build_model(CogLMForIterativeSuperResolution, CogLMIterativeSRConfig(**common), device, dtype)
    vq = build_model(lambda _: IceVQModel(channels=32, z_channels=32, embedding_dim=32, attn_resolutions=()), None,
                     device, dtype)  # fmt: skip
    labels = torch.randint(0, 500, (20000,), generator=torch.Generator().manual_seed(0))
    labels[:500] = torch.arange(500)
    pipe = CogView2Pipeline(tokenizer=None, image_tokenizer=vq, base_model=base, dsr_model=dsr, itersr_model=itersr,
                            scheduler=CogView2Scheduler(cluster_labels=labels.tolist()))  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


STAGES = ("generate_stage1", "direct_super_resolution", "iterative_super_resolution", "decode")


def run_pipeline(pipe: CogView2Pipeline, device: torch.device) -> dict:
    seconds = dict.fromkeys(STAGES, 0.0)
    passes = {"dsr_model": 0, "itersr_model": 0}
    for name in STAGES:
        method = getattr(pipe, name)

        def timed(*a, _method=method, _name=name, **k):
            synchronize(device)
            start = time.perf_counter()
            out = _method(*a, **k)
            synchronize(device)
            seconds[_name] += time.perf_counter() - start
            return out

        setattr(pipe, name, timed)
    for key in passes:
        getattr(pipe, key).register_forward_pre_hook(lambda *_, _key=key: passes.__setitem__(_key, passes[_key] + 1))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    prompt_ids = torch.randint(20000, 150000, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    generator = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(0)
    start = time.perf_counter()
    pipe(prompt_ids=prompt_ids, num_images_per_prompt=1, generator=generator, output_type="np")
    result = {"total_s": time.perf_counter() - start, **{f"{k}_s": v for k, v in seconds.items()}, **passes}
    result["dsr_pass_s"] = seconds["direct_super_resolution"] / max(passes["dsr_model"], 1)
    result["lopar_pass_s"] = seconds["iterative_super_resolution"] / max(passes["itersr_model"], 1)
    if device.type == "cuda":
        result["peak_GB"] = torch.cuda.max_memory_allocated() / 1e9
    return result


def part_pipeline(args, size, device, dtype) -> dict:
    return run_pipeline(build_pipeline(size, device, dtype), device)


def part_offload(args, size, device, dtype) -> dict:
    if device.type != "cuda":
        return {"skipped": "model offload moves models to an accelerator; none in the dry run"}
    if not hasattr(CogView2Pipeline, "enable_model_cpu_offload"):
        return {"skipped": "this diffusers has no enable_model_cpu_offload"}
    pipe = build_pipeline(size, device, dtype).to("cpu")  # initialised on the GPU (fast), then parked on the host
    torch.cuda.empty_cache()
    pipe.enable_model_cpu_offload()
    return run_pipeline(pipe, device)


PARTS = {"stage1": part_stage1, "pipeline": part_pipeline, "offload": part_offload}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=list(PARTS), nargs="+", required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny models on the CPU, nothing compiled")
    parser.add_argument("--json", help="also write the result as JSON to this file")
    parser.add_argument("--bandwidth-tbps", type=float, default=None, help="device memory bandwidth (TB/s)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry-run")
    size = TINY if args.dry_run else FULL
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    results = []
    for part in args.part:
        result = {"part": part, "device": machine, "torch": torch.__version__, "dtype": str(dtype), **size}
        result.update(PARTS[part](args, size, device, dtype))
        results.append(result)
        print(f"### {part} ({machine}, torch {torch.__version__}, {str(dtype).removeprefix('torch.')})\n")
        print("| quantity | value |\n|---|---|")
        for key, value in result.items():
            print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        print(flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
