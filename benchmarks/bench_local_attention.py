"""Side-by-side benchmark of the 2D local attention backends against dense attention over all keys.

Real CogView2 super-resolution shape: 60x60 queries, 9x5 window on the 60x60 keys + 5x5 window on the 20x20 keys
(cross-resolution x3) + 16 text keys (6 of them padding), head dim 64, one joint softmax.
Rows (each checked against the dense masked result before timing):
* ``dense eager``      materialises the masked ``N x N`` scores (the paper's baseline),
* ``dense SDPA masked``  ``F.scaled_dot_product_attention`` with the boolean mask (the ratios' baseline),
* ``dense SDPA all keys`` the fused kernel over all 4016 keys without a mask (a lower bound for dense attention),
* ``torch`` / ``flex`` / ``kernel`` / ``triton``: the `local_attention_2d` backends that are available (``triton``:
  on CUDA, from ``--triton-path``, default the checkout's ``hub_kernels/cogview2-local-attention-triton`` build).

Time: minimum over rounds (other processes share the CPU cores), median in brackets. Peak memory: the rise of the
CUDA allocator peak, or on CPU of the process peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) during
one call, measured in a child process per path whose glibc returns freed memory at once; it includes the output.

    PYTHONPATH=src python benchmarks/bench_local_attention.py                       # CPU, fp32, 8 heads
    PYTHONPATH=src python benchmarks/bench_local_attention.py --device cuda --dtype bfloat16 --heads 48 \\
        --kernel-path hub_kernels/cogview2-local-attention --triton-path hub_kernels/cogview2-local-attention-triton
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from coglm_hf import local_attention as la

GRID, WINDOW, CROSS_GRID, CROSS_WINDOW, TEXT, TEXT_PAD, DIM = (60, 60), (9, 5), (20, 20), (5, 5), 16, 6, 64


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    del out
    return (_status_kib("VmHWM") - before) * 1024


def _peak_in_child(name: str) -> int:
    """CPU peak memory of one path, measured in a fresh process whose glibc returns freed memory at once.

    Large blocks are mmapped (and unmapped on free) in a single arena, so RSS follows live memory; that makes
    every allocation page-fault, which is why timing runs in the parent process with default settings.
    """
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    result = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--memory-of", name], env=env, capture_output=True, text=True
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PEAK ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"memory measurement of {name!r} failed:\n{result.stderr[-2000:]}")
    return int(lines[-1].split()[1])


def time_call(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Seconds per call (mean over ``repeat`` back-to-back calls)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeat):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeat
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    parser.add_argument("--heads", type=int, default=None, help="default 8 on CPU, 48 on CUDA")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=None, help="calls per timed round (1 on CPU, 20 on CUDA)")
    parser.add_argument("--kernel-path", default=os.environ.get(la.KERNEL_PATH_ENV))
    parser.add_argument("--triton-path", default=os.environ.get(la.TRITON_KERNEL_PATH_ENV),
                        help="Triton kernel dir (default: the source checkout's build, CUDA only)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention backend")
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # child mode: peak memory of one path (CPU)
    args = parser.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    heads = args.heads or (48 if device.type == "cuda" else 8)
    repeat = args.repeat or (20 if device.type == "cuda" else 1)
    if device.type == "cpu":
        os.environ.setdefault(la.FLEX_COMPILE_ENV, "1")  # eager CPU flex materialises all scores; compile it

    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(args.backward)

    b, n, nc = args.batch, GRID[0] * GRID[1], CROSS_GRID[0] * CROSS_GRID[1]
    q, k, v = randn(b, heads, n, DIM), randn(b, heads, n, DIM), randn(b, heads, n, DIM)
    ck, cv = randn(b, heads, nc, DIM), randn(b, heads, nc, DIM)
    gk, gv = randn(b, heads, TEXT, DIM), randn(b, heads, TEXT, DIM)
    text_mask = (torch.arange(TEXT) >= TEXT_PAD).expand(b, TEXT).to(device)
    kwargs = dict(grid=GRID, window=WINDOW, cross_key=ck, cross_value=cv, cross_grid=CROSS_GRID,
                  cross_window=CROSS_WINDOW, global_key=gk, global_value=gv, global_key_mask=text_mask)  # fmt: skip
    scale = DIM**-0.5

    # Dense formulation over the concatenated keys [60x60 | 20x20 | text].
    mask = torch.cat(
        [la.local_attention_mask(GRID, WINDOW, device=device),
         la.local_attention_mask(GRID, CROSS_WINDOW, key_grid=CROSS_GRID, device=device),
         text_mask[0].expand(n, TEXT)], dim=1,
    )  # fmt: skip
    keys, values = torch.cat([k, ck, gk], dim=2).detach(), torch.cat([v, cv, gv], dim=2).detach()
    keys.requires_grad_(args.backward)
    values.requires_grad_(args.backward)
    num_keys = keys.shape[2]

    def dense_eager():
        scores = (q * scale) @ keys.transpose(-1, -2)
        probs = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(dtype)
        return probs @ values

    def sdpa_masked():
        return F.scaled_dot_product_attention(q * scale, keys, values, attn_mask=mask, scale=1.0)

    def sdpa_all():
        return F.scaled_dot_product_attention(q * scale, keys, values, scale=1.0)

    def backend(name: str) -> Callable[[], torch.Tensor]:
        def run():
            la.set_local_attention_backend(name)
            return la.local_attention_2d(q, k, v, **kwargs)

        return run

    paths: dict[str, Callable[[], torch.Tensor]] = {
        "dense eager (materialised N x N)": dense_eager,
        "dense SDPA masked (baseline)": sdpa_masked,
        "dense SDPA all keys, no mask": sdpa_all,
        "local_attention_2d torch": backend("torch"),
    }
    notes = []
    if not args.no_flex:
        paths["local_attention_2d flex"] = backend("flex")
    if args.kernel_path:
        try:
            la.load_local_attention_kernel(args.kernel_path)
            paths["local_attention_2d kernel"] = backend("kernel")
        except RuntimeError as err:
            notes.append(f"kernel not benchmarked: {err}")
    if device.type == "cuda":
        try:
            la.load_local_attention_triton_kernel(args.triton_path)
            paths["local_attention_2d triton"] = backend("triton")
        except RuntimeError as err:
            notes.append(f"triton not benchmarked: {err}")

    reference = sdpa_masked().detach().float()
    grad_out = torch.randn(reference.shape, generator=gen).to(device=device, dtype=dtype)

    def step(fn):
        if not args.backward:
            with torch.no_grad():
                return fn()
        out = fn()
        out.backward(grad_out)
        return out

    if args.memory_of:
        paths = {args.memory_of: paths[args.memory_of]}
    for name, fn in list(paths.items()):
        try:
            with torch.no_grad():
                err = (fn().float() - reference).abs().max().item()
            step(fn)  # warm-up (compilation, block masks, kernel load)
        except (RuntimeError, NotImplementedError) as e:
            notes.append(f"{name} skipped: {type(e).__name__}: {str(e).splitlines()[0]}")
            del paths[name]
            continue
        notes.append(f"{name}: max |out - dense masked| = {err:.2e}")

    if args.memory_of:
        print(f"PEAK {peak_extra_bytes(lambda: step(paths[args.memory_of]), device)}")
        return

    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):  # interleave the paths so that background load hits all of them alike
        for name, fn in paths.items():
            times[name].append(time_call(lambda fn=fn: step(fn), device, repeat))
    if device.type == "cpu":
        memory = {name: _peak_in_child(name) for name in paths}
    else:
        memory = {name: peak_extra_bytes(lambda fn=fn: step(fn), device) for name, fn in paths.items()}

    # FLOP ratio: exact work of the local formulation (valid keys per query) over dense work (all keys).
    valid = mask.sum().item() / n
    flop_ratio = valid / num_keys
    nxn = b * heads * n * num_keys * 4  # float32 scores of the dense formulation
    base = min(times["dense SDPA masked (baseline)"])
    fused_all = min(times["dense SDPA all keys, no mask"])
    base_mem = memory["dense SDPA masked (baseline)"]

    cpu = platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = f"{names[0]}, {len(names)} logical cores" if names else cpu
    if device.type == "cuda":
        cpu = torch.cuda.get_device_name(device)
    print(f"device: {device.type} ({cpu}), torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"dtype {str(dtype).removeprefix('torch.')}, batch {b}, heads {heads}, head dim {DIM}, "
          f"{'forward+backward' if args.backward else 'forward'}")  # fmt: skip
    print(f"shape: {GRID[0]}x{GRID[1]} queries; keys {n} (9x5 window) + {nc} (5x5 window, x3) + {TEXT} text "
          f"({TEXT_PAD} padding) = {num_keys}; mean valid keys/query {valid:.1f} -> FLOP ratio "
          f"{flop_ratio:.4f} (bound {1 / flop_ratio:.0f}x); full N x N fp32 scores = {nxn / 2**20:.1f} MiB")  # fmt: skip
    print()
    print("| path | best ms (median) | speed-up vs SDPA masked | vs SDPA all keys | peak extra MiB | vs SDPA masked "
          "| % of N x N scores |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in paths:
        best, med = min(times[name]) * 1e3, statistics.median(times[name]) * 1e3
        mem = memory[name]
        print(f"| {name} | {best:.2f} ({med:.2f}) | {base / min(times[name]):.2f}x | {fused_all / min(times[name]):.2f}x "
              f"| {mem / 2**20:.1f} | "
              f"{mem / max(base_mem, 1):.2f}x | {100 * mem / nxn:.1f}% |")  # fmt: skip
    print()
    for note in notes:
        print(f"- {note}")


if __name__ == "__main__":
    main()
