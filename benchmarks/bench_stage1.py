"""Stage-1 generation: the decoding loops side by side.

Every loop generates the same 400 image tokens (greedy, so all produce identical tokens — checked) with a small
CogLM config, in one process, and reports tokens/s and the ratio to the eager DynamicCache loop:

* uncached: the whole sequence recomputed at every step;
* eager DynamicCache: the prompt encoded once, one token per step against a growing KV cache;
* eager StaticCache: the same against a preallocated cache (every step attends over all its slots, masked);
* compiled StaticCache: the one-token step through ``torch.compile(model, fullgraph=True)`` (inductor; on CPU it
  needs a C++ compiler). Compilation happens in a warm-up run and is reported separately;
* the same with guard evaluation skipped (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, safe here:
  every step has the same shapes and the graph never changes), which removes dynamo's per-call guard checks.

A last line gives the floor of a decoding step on this machine: only its matrix products (every linear layer and the
image head on one token per image, no model code around them). At batch 1 a step reads all weights once (fp32), so
this bounds what removing Python and dispatch overhead can gain.

Times are wall-clock and CPU time of the process (with one thread, CPU time is steadier on a shared machine).

Usage:

    python benchmarks/bench_stage1.py [--hidden 256 --layers 4 --heads 4 --tokens 400 --text 16 --threads 1]
"""

import argparse
import platform
import time

import torch
from transformers import DynamicCache, StaticCache

from coglm_hf import CogLMConfig, CogLMForMaskedRegions
from coglm_hf.attention_masks import text_to_image_position_ids, text_to_image_regions
from coglm_hf.modeling_coglm import broadcast_prompt_cache


@torch.no_grad()
def generate_cached(model, prompt, num_tokens, cache, step_model=None, batch=1):
    """Prefill eagerly (batch 1), then one token per step for ``batch`` images through ``step_model`` (default: the
    eager model)."""
    config = model.config
    step_model = model if step_model is None else step_model
    text_length = prompt.shape[1] - 1
    positions = text_to_image_position_ids(text_length, num_tokens, config.boi_position_id)
    out = model(prompt, position_ids=positions[: text_length + 1], mask_regions=[text_to_image_regions(text_length, 0)],
                past_key_values=cache, use_cache=True, image_logits_only=True)
    broadcast_prompt_cache(cache, batch)
    tokens = []
    for step in range(num_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True).expand(batch, 1)
        tokens.append(token)
        if step + 1 == num_tokens:
            break
        t = text_length + 1 + step
        out = step_model(token, position_ids=positions[t : t + 1], past_key_values=cache, use_cache=True,
                         image_logits_only=True)
    return torch.cat(tokens, 1)


@torch.no_grad()
def generate_uncached(model, prompt, num_tokens, batch=1):
    config = model.config
    prompt = prompt.expand(batch, -1)
    text_length = prompt.shape[1] - 1
    positions = text_to_image_position_ids(text_length, num_tokens, config.boi_position_id)
    sequence = prompt
    for _ in range(num_tokens):
        n = sequence.shape[1] - text_length - 1
        logits = model(sequence, position_ids=positions[: sequence.shape[1]],
                       mask_regions=[text_to_image_regions(text_length, n)] * batch, use_cache=False, image_logits_only=True,
                       logits_to_keep=1).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return sequence[:, text_length + 1 :]


@torch.no_grad()
def matrix_products_only(model, batch, steps):
    """CPU seconds of ``steps`` rounds of one step's matrix products alone (layers' linears + image head)."""
    config = model.config
    inputs = {config.hidden_size: torch.randn(batch, config.hidden_size),
              config.intermediate_size: torch.randn(batch, config.intermediate_size)}
    linears = [m for layer in model.transformer.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    head = model.lm_head.weight[: config.num_image_tokens]
    start = time.process_time()
    for _ in range(steps):
        for linear in linears:
            linear(inputs[linear.in_features])
        torch.nn.functional.linear(inputs[config.hidden_size], head)
    return time.process_time() - start


def without_guards(run):
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        return run()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--text", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="images generated together from one prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
    parser.add_argument("--skip-uncached", action="store_true", help="leave out the slow full-recompute loop")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = CogLMConfig(vocab_size=20100, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, intermediate_size=4 * args.hidden, num_image_tokens=20000,
                         text_token_offset=20000, boi_token_id=20090, start_of_english_token_id=20091,
                         start_of_chinese_token_id=20092)
    model = CogLMForMaskedRegions(config).eval()
    model.set_attn_implementation("sdpa")
    prompt = torch.cat([torch.randint(20000, 20090, (1, args.text)), torch.tensor([[20090]])], 1)
    cache_length = args.text + 1 + args.tokens

    def static_cache():
        return StaticCache(config=config, max_cache_len=cache_length)

    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    n, b = args.tokens, args.batch
    loops = {
        "eager DynamicCache": lambda: generate_cached(model, prompt, n, DynamicCache(config=config), batch=b),
        "eager StaticCache": lambda: generate_cached(model, prompt, n, static_cache(), batch=b),
        "compiled StaticCache": lambda: generate_cached(model, prompt, n, static_cache(), compiled, batch=b),
        "compiled StaticCache, guards skipped": lambda: without_guards(
            lambda: generate_cached(model, prompt, n, static_cache(), compiled, batch=b)
        ),
    }
    if not args.skip_uncached:
        loops["uncached (full recompute per step)"] = lambda: generate_uncached(model, prompt, n, batch=b)

    start = time.perf_counter()
    loops["compiled StaticCache"]()  # warm-up: traces and compiles the one-token step
    compile_s = time.perf_counter() - start
    results = {}
    for name, run in loops.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens = run()
        results[name] = (time.perf_counter() - start, time.process_time() - start_cpu, tokens)
    reference_s, reference_cpu, reference_tokens = results["eager DynamicCache"]
    for name, (_, _, tokens) in results.items():
        assert torch.equal(tokens, reference_tokens), f"{name} generated different tokens"

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, prompt {args.text}+1, "
          f"{n} tokens, batch {b}")
    print("| loop | wall s | tokens/s (wall) | CPU s | tokens/s (CPU) | vs eager DynamicCache (wall / CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (seconds, cpu, _) in results.items():
        print(f"| {name} | {seconds:.2f} | {n * b / seconds:.1f} | {cpu:.2f} | {n * b / cpu:.1f} | "
              f"{reference_s / seconds:.2f}× / {reference_cpu / cpu:.2f}× |")
    floor_cpu = matrix_products_only(model, b, n)
    print(f"floor (matrix products only, {n} steps): {floor_cpu:.2f} CPU s, {n * b / floor_cpu:.1f} tokens/s, "
          f"{reference_cpu / floor_cpu:.2f}× the eager DynamicCache loop")
    print(f"compilation (warm-up run, once per shape): {compile_s:.1f} s")
    print("identical tokens: yes")


if __name__ == "__main__":
    main()
