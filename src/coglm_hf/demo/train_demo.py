"""Train the embedded demo family on the shapes world, end to end, on a CPU.

    python -m coglm_hf.demo.train_demo --work-dir ./demo-run --output src/coglm_hf/demo/weights

Steps (each resumable: a finished step leaves its folder in `--work-dir` and is skipped when run again):

1. `tokenizer/`: a small sentencepiece unigram model on the English and Chinese captions -> `CogLMTokenizer`.
2. `vq/`: a small `IceVQModel` (compression 8, `VQ_CODES` codes, the local patch encoder: the same 8x8 patch
   gets the same code wherever it lies, so the token models see few, repeatable sequences) trained with a
   straight-through VQ loop (reconstruction + commitment losses, EMA codebook, dead codes restarted on encoder
   outputs), then k-means cluster labels of its codebook (`IceVQModel.compute_cluster_labels`).
3. `cache_base/`, `cache_sr/`: training scenes tokenized once (`coglm_hf.training.data.build_token_cache`):
   captions and 10×10 (80 px) grids; captions, 10×10 and 30×30 (240 px) grids for the SR stages.
4. `base/`, `dsr/`, `itersr/`: the three CogLM stages, trained with the project's Trainer entry point
   (`coglm_hf.training.train.run`) on the cached tokens. The base model's captioning rows end in `<eos>`, so it
   also captions; both SR models start from the base weights, their 30x30 position tables interpolated from the
   base's 10x10 one.
5. `--output`: the pipeline folder (`CogView2Pipeline.save_pretrained(remote_code=False)`): safetensors weights
   and configs only, loaded with the installed package's classes; `save_pretrained` of the loaded pipeline
   exports a copy that carries its code (remote code).

Every random choice is seeded; with the same torch build the run is reproducible. The two SR stages train in two
processes (one thread each; DSR takes `--threads` once iterative SR is done) unless `--no-parallel-sr`.
`--threads` sets torch's intra-op threads for the other steps: 1 by default (on a busy machine two threads spin at
barriers and were ~10x slower), 2 on a quiet 2-core machine (the base stage runs ~1.5x faster). Measured times and
losses: docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from ..modeling_icevq import IceVQModel
from ..sampling import LOPAR_ORDER_MATRIX
from .shapes import (
    COLORS_ZH,
    HIRES_SIZE,
    LOWRES_SIZE,
    RELATIONS_ZH,
    SHAPES_ZH,
    ShapesDataset,
    image_to_array,
    random_scene,
    render,
)

VQ_CODES = 1024
VQ_CLUSTERS = 32
VQ_CONFIG = {
    "channels": 16,
    "z_channels": 64,
    "embedding_dim": 16,
    "num_embeddings": VQ_CODES,
    "encoder_channel_mult": (1, 2, 4, 4),
    "encoder_num_res_blocks": 2,
    "encoder_type": "patch",  # local codes: the same 8x8 patch gets the same code wherever it is
    "decoder_channel_mults": ((1, 2, 4, 4),),
    "decoder_num_res_blocks": 1,
    "resolution": LOWRES_SIZE,
    "attn_resolutions": (),
    "norm_num_groups": 8,
    "compress_rate": 8,
}


def _log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, flush=True)


# ---------------------------------------------------------------------------------------------- 1. text tokenizer

# The pipeline's default prompt template ("mainbody") appends this suffix; half of the training captions carry it
# so that prompts with and without it describe the same world.
STYLE_SUFFIX = " 高清摄影 隔绝"


def styled_caption(caption: str, rng: random.Random) -> str:
    return caption + STYLE_SUFFIX if rng.random() < 0.5 else caption


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level protobuf fields as (field number, raw bytes of the whole field) pairs."""
    out, pos = [], 0
    while pos < len(data):
        start, key, shift = pos, 0, 0
        while True:
            byte = data[pos]
            pos += 1
            key |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        wire = key & 7
        if wire == 0:
            while data[pos] & 0x80:
                pos += 1
            pos += 1
        elif wire == 2:
            length, shift = 0, 0
            while True:
                byte = data[pos]
                pos += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.append((key >> 3, data[start:pos]))
    return out


# sentencepiece piece types that hold text: NORMAL and USER_DEFINED (the world's words, see `world_words`)
TEXT_PIECE_KINDS = (1, 4)


def world_words(english_captions: list[str]) -> list[str]:
    """Every word of the shapes world, as sentencepiece user-defined pieces: "▁purple", "▁background", "紫色", ….

    A unigram model trained on a few dozen template words with a vocabulary this small splits many of them into
    letters ("▁bl", "u", "e"), and a 3-layer model then has to learn to spell colours before binding them.
    Whole-word pieces keep captions short (at most 19 pieces) and one piece per colour or shape. The English
    words come from the captions; the Chinese ones are the templates' colour, shape, relation and style words.
    """
    english = sorted({word.strip(",") for caption in english_captions for word in caption.split() if word.isascii()})
    chinese = sorted({*COLORS_ZH.values(), *SHAPES_ZH.values(), *RELATIONS_ZH.values(), "背景",
                      *STYLE_SUFFIX.split()})
    return ["▁" + word for word in english] + chinese


def _is_chinese(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


def order_pieces_english_first(model_file: Path) -> int:
    """Rewrite a sentencepiece model so that every text piece with Chinese characters comes after the others.

    CogView2's collator tags a caption as English when all its piece ids are below `chinese_piece_start` (icetk's
    vocabulary is laid out that way); unigram scores, not ids, drive segmentation, so the order is free. Control
    and unknown pieces keep their ids; normal and user-defined pieces are reordered. Returns the id of the first
    Chinese piece (the collator's `chinese_piece_start`).
    """
    from ..tokenization_coglm import read_sentencepiece_model

    spm = read_sentencepiece_model(model_file)
    fields = _fields(model_file.read_bytes())
    pieces = [raw for number, raw in fields if number == 1]
    others = [raw for number, raw in fields if number != 1]
    normal = [i for i, (_, _, kind) in enumerate(spm["pieces"]) if kind in TEXT_PIECE_KINDS]
    fixed = {i: pieces[i] for i in range(len(pieces)) if i not in normal}
    movable = [i for i in normal if not _is_chinese(spm["pieces"][i][0])] + [
        i for i in normal if _is_chinese(spm["pieces"][i][0])]
    order, queue = [], iter(movable)
    for i in range(len(pieces)):
        order.append(fixed[i] if i in fixed else pieces[next(queue)])
    model_file.write_bytes(b"".join(order) + b"".join(others))
    reread = read_sentencepiece_model(model_file)["pieces"]
    return next(i for i, (piece, _, kind) in enumerate(reread) if kind in TEXT_PIECE_KINDS and _is_chinese(piece))


def train_text_tokenizer(out_dir: Path, num_captions: int = 20000, vocab_size: int = 240, seed: int = 0) -> int:
    """Train a sentencepiece unigram model on captions of the training split; save a `CogLMTokenizer` in `out_dir`.

    Returns `chinese_piece_start` (see `order_pieces_english_first`).
    """
    import sentencepiece as spm

    from ..tokenization_coglm import CogLMTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = ShapesDataset(seed, split="train", length=num_captions)
    rng = random.Random(f"tokenizer/{seed}")
    english, chinese = [], []
    for i in range(num_captions):
        sample = dataset[i]
        english.append(styled_caption(sample.caption_en, rng))
        chinese.append(styled_caption(sample.caption_zh, rng))
    lines = [line for pair in zip(english, chinese) for line in pair]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "captions.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        prefix = Path(tmp) / "shapes_text"
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=vocab_size, model_type="unigram",
            character_coverage=1.0, hard_vocab_limit=False, pad_id=3, bos_id=-1, eos_id=-1, unk_id=0,
            user_defined_symbols=world_words(english), control_symbols=["<eos>"], num_threads=1, minloglevel=2,
        )
        model_file = prefix.with_suffix(".model")
        chinese_piece_start = order_pieces_english_first(model_file)
        tokenizer = CogLMTokenizer.from_sentencepiece(model_file, text_token_offset=VQ_CODES,
                                                      chinese_piece_start=chinese_piece_start)
    tokenizer.save_pretrained(out_dir)  # tokenizer_config.json keeps chinese_piece_start for finetuning
    return chinese_piece_start


# ------------------------------------------------------------------------------------------------- 2. VQ model


def _vq_batch(rng: random.Random, batch_size: int, crop: int = 32) -> torch.Tensor:
    """Random `crop`-px crops (on the 8-px token lattice), alternately of 80 px and of 240 px scenes.

    The VQ model is convolutional: small crops teach it both scales of the world at a fraction of the cost.
    """
    images = []
    for i in range(batch_size):
        size = LOWRES_SIZE if i % 2 == 0 else HIRES_SIZE
        full = image_to_array(render(random_scene(rng), size))
        top, left = (rng.randrange(0, size - crop + 1, 8) for _ in range(2))
        images.append(full[:, top : top + crop, left : left + crop])
    return torch.from_numpy(np.stack(images))


def train_vq(out_dir: Path, steps: int = 2000, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
             commitment: float = 0.25, decay: float = 0.95) -> IceVQModel:
    """VQ-VAE training of a small `IceVQModel`: straight-through gradients for encoder and decoder, the codebook
    updated as exponential moving averages of the encoder outputs assigned to each code (as icetk trained its
    codebook; steadier than a codebook loss), codes unused for a while restarted on random encoder outputs."""
    torch.manual_seed(seed)
    model = IceVQModel(**VQ_CONFIG)
    model.quantize.embed.weight.requires_grad_(False)
    rng = random.Random(f"vq/{seed}")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr, betas=(0.9, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * min(s, steps) / steps)))
    codebook = model.quantize.embed.weight
    cluster_size = torch.ones(VQ_CODES)
    embed_sum = codebook.detach().clone()
    start = time.time()
    for step in range(steps):
        images = _vq_batch(rng, batch_size, crop=48)
        target = model.normalize(images)
        z = model.quantize.proj(model.encode_latents(images))  # [B, D, h, w]
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if step == 0:  # start the codebook on encoder outputs
            with torch.no_grad():
                codebook.copy_(flat[torch.randint(0, flat.shape[0], (VQ_CODES,))])
                embed_sum.copy_(codebook)
        ids = model.quantize.nearest(z.detach())
        quant = model.quantize.lookup(ids)
        commit_loss = F.mse_loss(z, quant)
        recon = model.decs[0](z + (quant - z).detach())  # straight-through estimator
        recon_loss = F.mse_loss(recon, target) + 0.5 * (recon - target).abs().mean()
        loss = recon_loss + commitment * commit_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            onehot = F.one_hot(ids.flatten(), VQ_CODES).float()
            cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
            embed_sum.mul_(decay).add_(onehot.t() @ flat, alpha=1 - decay)
            codebook.copy_(embed_sum / cluster_size.clamp_min(1e-5)[:, None])
            dead = (cluster_size < 0.03).nonzero().flatten()
            if len(dead) and step < steps * 0.9:
                fresh = flat[torch.randint(0, flat.shape[0], (len(dead),))]
                codebook[dead] = fresh
                embed_sum[dead] = fresh
                cluster_size[dead] = 1.0
        if step % 100 == 0 or step == steps - 1:
            _log(f"vq step {step}/{steps} loss {loss.item():.4f} recon {recon_loss.item():.4f} "
                 f"codes alive {(cluster_size > 0.03).sum().item()} ({time.time() - start:.0f}s)")
    model.eval()
    labels = model.compute_cluster_labels(VQ_CLUSTERS, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    (out_dir / "cluster_labels.json").write_text(json.dumps(labels.tolist()))
    return model


# ------------------------------------------------------------------------------------------------ 3. token cache


def shapes_records(num_samples: int, seed: int = 0):
    """`ImageTextRecord`s of the training split: 240 px renders with an English and a Chinese caption."""
    from ..training.data import ImageTextRecord

    dataset = ShapesDataset(seed, split="train", length=num_samples)
    rng = random.Random(f"captions/{seed}")
    for i in range(num_samples):
        sample = dataset[i]
        yield ImageTextRecord(
            key=f"shapes-{seed}-{i}", source=f"shapes[{i}]",
            load_image=lambda scene=sample.scene: render(scene, HIRES_SIZE),
            texts=[styled_caption(sample.caption_en, rng), styled_caption(sample.caption_zh, rng)],
        )


def build_cache(cache_dir: Path, vq_dir: Path, tokenizer_dir: Path, num_samples: int, hires: bool,
                seed: int = 0) -> None:
    """Tokenize `num_samples` training scenes once into `cache_dir`: 80 px -> 10x10 grids and, with `hires`,
    240 px -> 30x30 grids (the super-resolution stages; 9x the encoding cost, so that cache is smaller)."""
    from ..tokenization_coglm import CogLMTokenizer
    from ..training.data import build_token_cache

    vq = IceVQModel.from_pretrained(vq_dir).eval()
    tokenizer = CogLMTokenizer.from_pretrained(tokenizer_dir)
    report = build_token_cache(shapes_records(num_samples, seed), cache_dir, vq, tokenizer, image_size=LOWRES_SIZE,
                               hires_size=HIRES_SIZE if hires else None, min_image_size=0, batch_size=32,
                               num_workers=0, total=num_samples, progress=False)
    _log(f"token cache {cache_dir.name}: {report.summary()}")


# --------------------------------------------------------------------------------------------- 4. CogLM stages

# Sizes of the demo family: a 10x10 stage-1 grid (80 px), a 30x30 super-resolution grid (240 px).
BACKBONE = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512,
            "initializer_range": 0.02}
MAX_TEXT = 32  # captions are at most 19 pieces; the rest is room for the prompt template and users
ITERSR_LOPAR_FRACTION = 0.75  # iterative-SR samples masked as one LoPAR pass (the rest: the paper's random masks)


def model_configs(tokenizer_dir: Path) -> dict[str, dict]:
    """Config fields of the three stages, with the id layout of the trained tokenizer."""
    from ..tokenization_coglm import CogLMTokenizer

    tokenizer = CogLMTokenizer.from_pretrained(tokenizer_dir)
    vocab = tokenizer.start_of_chinese_token_id + 1
    image_grid, hires_grid = LOWRES_SIZE // 8, HIRES_SIZE // 8
    max_positions = MAX_TEXT + 1 + image_grid * image_grid + 11  # text, <start_of_image>, grid, spare rows
    base = {
        **BACKBONE, "vocab_size": vocab, "num_image_tokens": VQ_CODES, "text_token_offset": VQ_CODES,
        "boi_token_id": tokenizer.boi_token_id, "start_of_english_token_id": tokenizer.start_of_english_token_id,
        "start_of_chinese_token_id": tokenizer.start_of_chinese_token_id, "pad_token_id": 0,
        "max_position_embeddings": max_positions, "boi_position_id": MAX_TEXT, "image_grid_size": image_grid,
        "max_text_length": MAX_TEXT,
    }
    sr = {**base, "hires_grid_size": hires_grid, "hires_position_offset": max_positions}
    return {"base": base, "dsr": {**sr, "sr_text_slots": MAX_TEXT}, "itersr": {**sr, "sr_text_slots": MAX_TEXT}}


def caption_end_id(tokenizer_dir: Path) -> int:
    """Id of the tokenizer's `<eos>` piece, which ends the captions of captioning rows."""
    from ..tokenization_coglm import CogLMTokenizer

    return CogLMTokenizer.from_pretrained(tokenizer_dir).convert_tokens_to_ids("<eos>")


def stage_config(stage: str, work: Path, steps: int, batch_size: int, learning_rate: float, seed: int) -> dict:
    """The `coglm_hf.training.train` config of one stage (the same dict a YAML file would hold)."""
    configs = model_configs(work / "tokenizer")
    config = {
        "stage": stage,
        "model_config": configs[stage],
        "resume_from_checkpoint": True,
        "data": {"cache_dir": str(work / ("cache_base" if stage == "base" else "cache_sr"))},
        "collator": {},
        "training": {
            "output_dir": str(work / stage), "per_device_train_batch_size": batch_size, "max_steps": steps,
            "learning_rate": learning_rate, "warmup_steps": max(10, steps // 20), "weight_decay": 0.01,
            "activation_checkpointing": False, "logging_steps": 25, "save_steps": max(50, steps // 4),
            "save_total_limit": 1, "dataloader_num_workers": 0, "seed": seed, "use_cpu": True,
            "disable_tqdm": True,
        },
    }
    if stage == "base":
        config["data"]["tokenizer"] = str(work / "tokenizer")  # its chinese_piece_start sets the language tags
        # captioning rows end in <eos> so that the base model also captions, and knows when to stop
        config["collator"] = {"caption_ratio": 0.3, "caption_end_token_id": caption_end_id(work / "tokenizer")}
    if stage in ("dsr", "itersr"):
        config["init_from_base"] = str(work / "base")  # as CogView2: SR models start from the base weights
        config["hires_position_init"] = "interpolate"  # the 30x30 table from the base's 10x10 one, bilinearly
    if stage == "itersr":
        # most samples mask what one LoPAR pass regenerates: trained on the paper's random masks alone, iterative SR
        # rounded the corners of ground-truth squares and stars that it only had to keep
        config["collator"] = {"lopar_fraction": ITERSR_LOPAR_FRACTION}
    if stage == "dsr":
        config["trainable_parameters"] = "all"  # tiny backbone: the official frozen-backbone recipe underfits
    return config


class ThreadsAfterExit(TrainerCallback):
    """Raise this process's torch threads to `threads` once `process` has exited, so that DSR, which trains longer
    than the iterative SR beside it, gets the core that process frees (checked after every step)."""

    def __init__(self, process: subprocess.Popen, threads: int):
        self.process, self.threads = process, threads

    def on_step_end(self, args, state, control, **kwargs):
        if self.process is not None and self.process.poll() is not None:
            torch.set_num_threads(self.threads)
            _log(f"step {state.global_step}: the other process is done, {self.threads} threads from now on")
            self.process = None


def train_stage(stage: str, work: Path, steps: int, batch_size: int, learning_rate: float, seed: int = 0,
                callbacks: list | None = None) -> Path:
    """Train one stage with the project's Trainer entry point (`callbacks`: extra `TrainerCallback`s); returns its
    output folder (the final model)."""
    from ..training.train import run

    if (work / stage / "config.json").is_file():
        _log(f"{stage}: already trained in {work / stage}")
        return work / stage
    _log(f"{stage}: training {steps} steps of {batch_size}")
    trainer = run(stage_config(stage, work, steps, batch_size, learning_rate, seed), callbacks)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    _log(f"{stage}: loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else f"{stage}: no loss logged")
    (work / f"{stage}_losses.json").write_text(json.dumps(losses))
    return work / stage


# ------------------------------------------------------------------------------------------------ 5. pipeline

# Sampler defaults scaled to the demo codebook (1024 codes in 32 clusters instead of 20000 in 500).
# Direct SR takes the most likely token of every cell: sampled independently, neighbouring cells disagreed and
# frayed the outlines. Iterative SR runs LoPAR's last two passes only (the official order matrix minus 4: cells of
# order 5 and 6, 17 % of the grid, are regenerated; the rest keep direct SR's tokens): this small iterative-SR model
# predicts a cell from its neighbours less accurately than direct SR does from the low-res grid (docs/demo.md).
DEMO_LOPAR_ORDER_MATRIX = [[value - 4 for value in row] for row in LOPAR_ORDER_MATRIX]
DEMO_SAMPLER = {"temperature": 1.0, "top_k_clusters": 2, "cluster_temperature": 1.0, "dsr_top_k_clusters": 1,
                "dsr_cluster_temperature": 0.0, "itersr_top_k": [2, 2], "lopar_order_matrix": DEMO_LOPAR_ORDER_MATRIX}


def assemble_pipeline(work: Path, output: Path) -> Path:
    """Load the trained components and save them as one pipeline folder at `output` (atomic, safetensors; no code,
    as the demo ships inside the package)."""
    from ..modeling_coglm import CogLMForMaskedRegions
    from ..modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
    from ..pipeline_cogview2 import CogView2Pipeline
    from ..scheduling_cogview2 import CogView2Scheduler
    from ..tokenization_coglm import CogLMTokenizer

    labels = json.loads((work / "vq" / "cluster_labels.json").read_text())
    pipeline = CogView2Pipeline(
        tokenizer=CogLMTokenizer.from_pretrained(work / "tokenizer"),
        image_tokenizer=IceVQModel.from_pretrained(work / "vq"),
        base_model=CogLMForMaskedRegions.from_pretrained(work / "base"),
        dsr_model=CogLMForDirectSuperResolution.from_pretrained(work / "dsr"),
        itersr_model=CogLMForIterativeSuperResolution.from_pretrained(work / "itersr"),
        scheduler=CogView2Scheduler(cluster_labels=labels, **DEMO_SAMPLER),
    )
    pipeline.save_pretrained(output, remote_code=False)
    size = sum(f.stat().st_size for f in output.rglob("*.safetensors"))
    _log(f"pipeline saved to {output} ({size / 2**20:.1f} MiB of safetensors)")
    return output


STEPS = {"base": 7000, "dsr": 4500, "itersr": 1500}
BATCH = {"base": 24, "dsr": 4, "itersr": 4}
LR = {"base": 1e-3, "dsr": 5e-4, "itersr": 1e-3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m coglm_hf.demo.train_demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default="./demo-run", help="intermediate results (resumable)")
    parser.add_argument("--output", default=None, help="pipeline folder to write at the end")
    parser.add_argument("--only", choices=["tokenizer", "vq", "cache", "base", "dsr", "itersr", "pipeline"],
                        default=None, help="run one step only (the steps before it must be done)")
    parser.add_argument("--vq-steps", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=30000, help="training scenes of the base stage")
    parser.add_argument("--sr-samples", type=int, default=5000, help="training scenes of the SR stages")
    for stage in STEPS:
        parser.add_argument(f"--{stage}-steps", type=int, default=STEPS[stage])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest on a busy 2-core machine: no spinning at barriers)")
    parser.add_argument("--no-parallel-sr", dest="parallel_sr", action="store_false",
                        help="train the two SR stages one after the other instead of in two processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    torch.set_num_threads(args.threads)
    work = Path(args.work_dir)

    def wanted(step: str) -> bool:
        return args.only in (None, step)

    if wanted("tokenizer") and not (work / "tokenizer" / "tokenizer.json").is_file():
        train_text_tokenizer(work / "tokenizer", seed=args.seed)
    if wanted("vq") and not (work / "vq" / "cluster_labels.json").is_file():
        train_vq(work / "vq", steps=args.vq_steps, seed=args.seed)
    if wanted("cache"):
        build_cache(work / "cache_base", work / "vq", work / "tokenizer", args.samples, hires=False, seed=args.seed)
        build_cache(work / "cache_sr", work / "vq", work / "tokenizer", args.sr_samples, hires=True, seed=args.seed)
    if wanted("base"):
        train_stage("base", work, args.base_steps, BATCH["base"], LR["base"], seed=args.seed)
    helper = None
    if args.only is None and args.parallel_sr and not (work / "itersr" / "config.json").is_file():
        # the SR stages are independent: iterative SR in a second process (one thread each) while DSR trains here
        command = [sys.executable, "-m", "coglm_hf.demo.train_demo", "--work-dir", str(work), "--only", "itersr",
                   "--itersr-steps", str(args.itersr_steps), "--threads", "1", "--seed", str(args.seed)]
        _log("itersr: training in a second process")
        helper = subprocess.Popen(command)
        torch.set_num_threads(1)
    try:
        for stage in ("dsr", "itersr"):
            if wanted(stage) and not (stage == "itersr" and helper is not None):
                callbacks = [ThreadsAfterExit(helper, args.threads)] if helper is not None else None
                train_stage(stage, work, getattr(args, f"{stage}_steps"), BATCH[stage], LR[stage], seed=args.seed,
                            callbacks=callbacks)
    finally:
        if helper is not None and helper.wait() != 0:
            raise RuntimeError(f"the iterative SR process failed (exit code {helper.returncode}); run "
                               f"`--only itersr` to see why")
    if args.output and wanted("pipeline"):
        assemble_pipeline(work, Path(args.output))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
