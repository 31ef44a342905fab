"""Finetune the demo base model for captioning: the pretraining mixture, with captions that end.

    python -m coglm_hf.demo.finetune_captioning --work-dir ./caption-run [--steps 400] [--install]

The shipped base model was pretrained on the CogLM mixture (30 % mask-prediction + captioning rows). Its captions
name the scene but never stop: the official caption rows have no end token, so the model keeps writing after the
caption. This finetune continues the same objective through the project's Trainer entry point
(`coglm_hf.training.train.run`) with half of the rows captioning rows (`caption_ratio=0.5`, the paper's mixture)
and the tokenizer's `<eos>` piece appended to every caption (`caption_end_token_id`), so that captioning learns
where to stop. Text→image rows are unchanged, which keeps generation as it was.

Steps (resumable): a token cache of `--samples` training scenes (`cache/`), the Trainer run (`base/`), and with
`--install` the new weights written over the shipped `base_model/model.safetensors` (the config and code stay).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from . import default_model_path
from .train_demo import build_cache


def chinese_piece_start(tokenizer) -> int:
    """Sentencepiece id of the first text piece holding a Chinese character (the collator's language-tag split)."""
    offset = tokenizer.text_token_offset
    for token_id in range(offset, tokenizer.boi_token_id):
        if any("\u3000" <= ch <= "\u9fff" for ch in tokenizer.convert_ids_to_tokens(token_id)):
            return token_id - offset
    raise ValueError("the tokenizer has no Chinese piece")


def finetune_config(work: Path, model: Path, steps: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    """The `coglm_hf.training.train` config of the captioning finetune."""
    from ..tokenization_coglm import CogLMTokenizer

    tokenizer = CogLMTokenizer.from_pretrained(model / "tokenizer")
    end = tokenizer.convert_tokens_to_ids("<eos>")
    return {
        "stage": "base",
        "model": str(model / "base_model"),
        "resume_from_checkpoint": True,
        "data": {"cache_dir": str(work / "cache")},
        "collator": {"caption_ratio": 0.5, "chinese_piece_start": chinese_piece_start(tokenizer),
                     "caption_end_token_id": end},
        "training": {
            "output_dir": str(work / "base"), "per_device_train_batch_size": batch_size, "max_steps": steps,
            "learning_rate": learning_rate, "lr_scheduler_type": "constant_with_warmup",
            "warmup_steps": max(10, steps // 20), "weight_decay": 0.01, "activation_checkpointing": False,
            "logging_steps": 25, "save_steps": max(50, steps // 4), "save_total_limit": 1,
            "dataloader_num_workers": 0, "seed": seed, "use_cpu": True, "disable_tqdm": True,
        },
    }


def install(trained: Path, model: Path) -> Path:
    """Write the finetuned weights over `model/base_model/model.safetensors` (atomically; same tensor names)."""
    from safetensors.torch import load_file, save_file

    target = model / "base_model" / "model.safetensors"
    shipped = load_file(target)
    weights = load_file(trained / "model.safetensors")
    if set(weights) != set(shipped):
        raise ValueError(f"{trained} holds different tensors than {target}; it is not a finetune of this model")
    staging = target.with_suffix(".tmp")
    save_file({name: weights[name].contiguous() for name in shipped}, staging, metadata={"format": "pt"})
    staging.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coglm_hf.demo.finetune_captioning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="./caption-run", help="cache and Trainer output (resumable)")
    parser.add_argument("--model", default=None, help="pipeline folder to start from (default: the demo model)")
    parser.add_argument("--samples", type=int, default=8000, help="training scenes in the token cache")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--install", action="store_true",
                        help="write the finetuned weights into the --model folder's base_model")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(args.threads)
    work, model = Path(args.work_dir), Path(args.model or default_model_path())
    if not (work / "cache").is_dir():
        start = time.perf_counter()
        build_cache(work / "cache", model / "image_tokenizer", model / "tokenizer", args.samples, hires=False,
                    seed=args.seed)
        print(f"token cache: {time.perf_counter() - start:.0f} s", flush=True)
    from ..training.train import run

    start = time.perf_counter()
    trainer = run(finetune_config(work, model, args.steps, args.batch_size, args.learning_rate, args.seed))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    (work / "losses.json").write_text(json.dumps(losses))
    print(f"finetune: {time.perf_counter() - start:.0f} s, loss {losses[0]:.3f} -> {losses[-1]:.3f}", flush=True)
    if args.install:
        print(f"installed {install(work / 'base', model)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
