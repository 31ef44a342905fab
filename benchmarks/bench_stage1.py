"""Stage-1 generation: cached decoding vs recomputing the whole sequence at every step.

Both loops generate the same 400 image tokens (greedy cluster rule, so both produce identical tokens) with a small
CogLM config, in one process, and report tokens/s and the ratio. Usage:

    python benchmarks/bench_stage1.py [--hidden 256 --layers 4 --heads 4 --tokens 400 --text 16]
"""

import argparse
import platform
import time

import torch
from transformers import DynamicCache

from coglm_hf import CogLMConfig, CogLMForMaskedRegions
from coglm_hf.attention_masks import text_to_image_position_ids, text_to_image_regions


@torch.no_grad()
def generate_cached(model, prompt, num_tokens):
    config = model.config
    text_length = prompt.shape[1] - 1
    positions = text_to_image_position_ids(text_length, num_tokens, config.boi_position_id)
    cache = DynamicCache(config=config)
    out = model(prompt, position_ids=positions[: text_length + 1], mask_regions=[text_to_image_regions(text_length, 0)],
                past_key_values=cache, use_cache=True, image_logits_only=True)
    tokens = []
    for step in range(num_tokens):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        if step + 1 == num_tokens:
            break
        t = text_length + 1 + step
        out = model(token, position_ids=positions[t : t + 1], past_key_values=cache, use_cache=True,
                    image_logits_only=True)
    return torch.cat(tokens, 1)


@torch.no_grad()
def generate_uncached(model, prompt, num_tokens):
    config = model.config
    text_length = prompt.shape[1] - 1
    positions = text_to_image_position_ids(text_length, num_tokens, config.boi_position_id)
    sequence = prompt
    for _ in range(num_tokens):
        n = sequence.shape[1] - text_length - 1
        logits = model(sequence, position_ids=positions[: sequence.shape[1]],
                       mask_regions=[text_to_image_regions(text_length, n)], use_cache=False, image_logits_only=True,
                       logits_to_keep=1).logits
        sequence = torch.cat([sequence, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return sequence[:, text_length + 1 :]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--text", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a busy machine)")
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

    results = {}
    for name, fn in (("cached", generate_cached), ("uncached", generate_uncached)):
        start = time.perf_counter()
        tokens = fn(model, prompt, args.tokens)
        results[name] = (time.perf_counter() - start, tokens)
    assert torch.equal(results["cached"][1], results["uncached"][1]), "both loops must generate the same tokens"
    cached_s, uncached_s = results["cached"][0], results["uncached"][0]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"config: hidden {args.hidden}, layers {args.layers}, heads {args.heads}, prompt {args.text}+1, {args.tokens} tokens")
    print("| loop | seconds | tokens/s | speed-up |")
    print("|---|---:|---:|---:|")
    print(f"| uncached (full recompute per step) | {uncached_s:.2f} | {args.tokens / uncached_s:.1f} | 1.00× |")
    print(f"| cached (prompt once, KV cache) | {cached_s:.2f} | {args.tokens / cached_s:.1f} | {uncached_s / cached_s:.2f}× |")
    print("identical tokens: yes")


if __name__ == "__main__":
    main()
