"""Training entry point: loss falls for every stage, gradient accumulation and 2-process DDP match one big batch,
interrupted runs resume exactly, the data pipeline reports and skips bad files, shipped configs are valid."""

from __future__ import annotations

import io
import json
import math
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from coglm_hf.training.data import (
    TokenCacheDataset,
    TokenCacheWriter,
    build_token_cache,
    hf_dataset_records,
    image_folder_records,
    resize_center_crop,
)
from coglm_hf.training.train import (
    CONFIG_DIR,
    STAGES,
    apply_overrides,
    build_model,
    build_trainer,
    init_from_base,
    main,
    run,
    training_arguments,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models are far faster on one thread than with intra-op threads fighting over 2 shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_synthetic_cache(path: Path, num: int = 32, classes: int = 4, seed: int = 0) -> Path:
    """Learnable token data for the tiny configs: a 4×4 pattern per class, its 12×12 nearest upsampling, class
    captions of varying length (3–7 ids) and a second-language caption on every third sample."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 64, (classes, 4, 4), generator=g)
    info = {"compress_rate": 8, "num_embeddings": 64, "image_tokens_size": 32, "hires_tokens_size": 96}
    writer = TokenCacheWriter(path, info, shard_size=10)
    for i in range(num):
        c = i % classes
        low = patterns[c]
        high = low.repeat_interleave(3, 0).repeat_interleave(3, 1)
        text = [64 + 10 * c + k for k in range(3 + i % 5)]
        second = [150 + c, 151 + c] if i % 3 == 0 else None
        writer.add(f"sample-{i}", f"synthetic[{i}]", text, second, image_tokens=low, hires_tokens=high)
    writer.flush()
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_synthetic_cache(tmp_path_factory.mktemp("cache") / "tokens")


def tiny_config(stage: str, cache: Path, output_dir: Path, **training) -> dict:
    return {
        "stage": stage,
        "model_config": str(CONFIG_DIR / f"tiny_{stage}.json"),
        "data": {"cache_dir": str(cache)},
        "collator": {"patch_size": 2} if stage == "base" else {},
        "training": {
            "output_dir": str(output_dir), "use_cpu": True, "per_device_train_batch_size": 8, "warmup_steps": 0,
            "lr_scheduler_type": "constant", "logging_steps": 1, "save_steps": 1000, "disable_tqdm": True,
            "activation_checkpointing": False, "dataloader_num_workers": 0, **training,
        },
    }


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ---------------------------------------------------------------------------------------------- each stage learns
@pytest.mark.parametrize(
    ("stage", "learning_rate", "checkpointing"),
    [("base", 3e-3, True), ("dsr", 1e-2, True), ("itersr", 1e-2, False)],
)
def test_loss_falls(stage, learning_rate, checkpointing, cache, tmp_path):
    config = tiny_config(stage, cache, tmp_path / stage, max_steps=30, learning_rate=learning_rate,
                         activation_checkpointing=checkpointing)
    trainer = run(config)
    curve = losses(trainer)
    assert len(curve) == 30 and all(torch.isfinite(torch.tensor(curve)))
    start, end = curve[0], sum(curve[-5:]) / 5
    assert end < 0.85 * start, f"{stage}: loss {start:.3f} → {end:.3f}"
    assert (tmp_path / stage / "model.safetensors").is_file()


def test_direct_sr_trains_only_the_hires_attention_and_positions(cache, tmp_path):
    trainer = run(tiny_config("dsr", cache, tmp_path, max_steps=3, learning_rate=1e-2))
    initial = build_model(STAGES["dsr"], {"model_config": str(CONFIG_DIR / "tiny_dsr.json")}, seed=42)
    changed = {name for name, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), initial.state_dict()[name])}
    hires = {name for name in changed if any(k in name for k in ("hires_query_key_value", "hires_dense",
                                                                 "hires_position_embeddings"))}
    assert changed == hires
    assert "transformer.hires_position_embeddings.weight" in changed
    assert any("hires_query_key_value" in name for name in changed) and any("hires_dense" in n for n in changed)


def test_init_from_base_copies_backbone_and_tiles_positions(tmp_path):
    base = build_model(STAGES["base"], {"model_config": str(CONFIG_DIR / "tiny_base.json")}, seed=1)
    base.save_pretrained(tmp_path / "base")
    dsr = build_model(STAGES["dsr"], {"model_config": str(CONFIG_DIR / "tiny_dsr.json")}, seed=2)
    init_from_base(dsr, tmp_path / "base")
    layer, base_layer = dsr.transformer.layers[1].attention, base.transformer.layers[1].attention
    assert torch.equal(layer.query_key_value.weight, base_layer.query_key_value.weight)
    assert torch.equal(layer.hires_query_key_value.weight, base_layer.query_key_value.weight)
    assert torch.equal(layer.hires_dense.bias, base_layer.dense.bias)
    assert torch.equal(dsr.transformer.word_embeddings.weight, base.transformer.word_embeddings.weight)
    table, rows = dsr.transformer.hires_position_embeddings.weight, base.transformer.position_embeddings.weight
    # hi-res cell (R, C) of the 12×12 grid gets base image row 33 + (R mod 4)·4 + (C mod 4)
    assert torch.equal(table[5 * 12 + 10], rows[33 + 1 * 4 + 2])
    assert torch.equal(table[0], rows[33])


def test_init_from_base_can_interpolate_the_position_table(tmp_path):
    base = build_model(STAGES["base"], {"model_config": str(CONFIG_DIR / "tiny_base.json")}, seed=1)
    base.save_pretrained(tmp_path / "base")
    dsr = build_model(STAGES["dsr"], {"model_config": str(CONFIG_DIR / "tiny_dsr.json")}, seed=2)
    init_from_base(dsr, tmp_path / "base", hires_positions="interpolate")
    table, rows = dsr.transformer.hires_position_embeddings.weight, base.transformer.position_embeddings.weight
    # 4×4 stage-1 grid -> 12×12: hi-res cell (R, C) sits at stage-1 coordinate ((R + ½)/3 − ½, (C + ½)/3 − ½);
    # cell (4, 7) is the centre of stage-1 cell (1, 2), cell (0, 0) clamps to stage-1 cell (0, 0)
    torch.testing.assert_close(table[4 * 12 + 7], rows[33 + 1 * 4 + 2])
    torch.testing.assert_close(table[0], rows[33])
    # cell (5, 4) lies a third of the way from stage-1 row 1 to row 2 (column 1): linear in between
    torch.testing.assert_close(table[5 * 12 + 4], rows[33 + 1 * 4 + 1] * 2 / 3 + rows[33 + 2 * 4 + 1] / 3)
    with pytest.raises(ValueError, match="hires_position_init must be one of"):
        init_from_base(dsr, tmp_path / "base", hires_positions="nearest")
    with pytest.raises(ValueError, match="hires_position_init only applies with init_from_base"):
        build_model(STAGES["dsr"], {"model_config": str(CONFIG_DIR / "tiny_dsr.json"),
                                    "hires_position_init": "interpolate"})

# ---------------------------------------------------------------------------------------------- gradient accumulation
def _one_step(stage, cache, tmp_path, batch, accumulation, naive=False):
    config = tiny_config(stage, cache, tmp_path, max_steps=1, optim="sgd", learning_rate=1.0, weight_decay=0.0,
                         max_grad_norm=0.0, per_device_train_batch_size=batch,
                         gradient_accumulation_steps=accumulation)
    trainer = build_trainer(config)
    if naive:  # per-micro-batch mean loss (Trainer's default for models without loss kwargs): must NOT match
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("stage", ["base", "itersr"])
def test_gradient_accumulation_1x4_equals_4x1(stage, cache, tmp_path):
    """Rows with different numbers of loss terms (text length, row type, iterative-SR mask ratio)."""
    fresh = build_model(STAGES[stage], {"model_config": str(CONFIG_DIR / f"tiny_{stage}.json")})
    initial = {n: p.detach() for n, p in fresh.named_parameters()}
    big = _one_step(stage, cache, tmp_path / "a", batch=4, accumulation=1)
    accumulated = _one_step(stage, cache, tmp_path / "b", batch=1, accumulation=4)
    naive = _one_step(stage, cache, tmp_path / "c", batch=1, accumulation=4, naive=True)
    update = max(float((big[n] - initial[n]).abs().max()) for n in big)
    error = max(float((big[n] - accumulated[n]).abs().max()) for n in big)
    naive_error = max(float((big[n] - naive[n]).abs().max()) for n in big)
    assert update > 1e-3
    assert error < 1e-5 * max(update, 1.0), error
    assert naive_error > 100 * error + 1e-4  # variable-length rows: per-batch means weight tokens unequally


def test_dataloader_workers_and_epochs(cache):
    """Per-sample seeds: 2 dataloader workers give exactly the batches of 0 workers; a new epoch new choices."""
    from torch.utils.data import DataLoader

    from coglm_hf.configuration_coglm import CogLMConfig
    from coglm_hf.training.collators import CogLMPretrainingCollator

    config = CogLMConfig(**json.loads((CONFIG_DIR / "tiny_base.json").read_text()))
    dataset = TokenCacheDataset(cache, require=("image_tokens",))
    collator = CogLMPretrainingCollator(config, patch_size=2, seed=0)

    def batches(workers):
        loader = DataLoader(dataset, batch_size=8, collate_fn=collator, num_workers=workers)
        return [(b["input_ids"], b["mask_regions"]) for b in loader]

    inline, parallel = batches(0), batches(2)
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(inline, parallel))
    dataset.set_epoch(1)
    assert any(not torch.equal(a[0], b[0]) or a[1] != b[1] for a, b in zip(inline, batches(0)))


# ---------------------------------------------------------------------------------------------- interruption
def test_two_process_run_stops_resumes_and_matches_one_big_batch(cache, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): stop after step 3 (checkpoint), rerun the same command (resumes
    from checkpoint-3, finishes at step 8). The resumed loss curve equals an uninterrupted single-process run
    with the same global batch (2 ranks × 2 = 4), which also checks the cross-rank num_items_in_batch scaling."""
    output = tmp_path / "ddp"
    config = tiny_config("base", cache, output, max_steps=8, per_device_train_batch_size=2, optim="sgd",
                         learning_rate=0.5, lr_scheduler_type="linear")
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
              str(29500 + random.randint(0, 2000)), "-m", "coglm_hf.training.train", "--config", str(config_file)]

    first = subprocess.run(launch + ["--stop-at-step", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    steps_per_epoch = 32 // (2 * 2)  # 32 samples, 2 ranks × batch 2: proves both processes took part
    assert state["epoch"] == pytest.approx(3 / steps_per_epoch)
    assert not (output / "model.safetensors").exists()  # interrupted: no final model

    second = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "checkpoint-3" in second.stderr
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] == 8 and state["epoch"] == pytest.approx(8 / steps_per_epoch)
    resumed = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(resumed) == 8

    reference = run(tiny_config("base", cache, tmp_path / "single", max_steps=8, per_device_train_batch_size=4,
                                optim="sgd", learning_rate=0.5, lr_scheduler_type="linear"))
    assert resumed == pytest.approx(losses(reference), rel=1e-4)
    assert resumed[-1] < resumed[0]


@pytest.mark.gpu
def test_fsdp2_two_gpus_sharded_checkpoint_resumes_like_one_process(cache, tmp_path):
    """The shipped FSDP2 Accelerate config on 2 GPUs: stop at step 3 (sharded checkpoint), resume, finish; the loss
    curve equals one process with the same global batch. Not runnable on CPU: Accelerate 1.15 switches to FSDP only
    for accelerator backends and runs plain DDP on CPU (docs/training.md)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    output = tmp_path / "fsdp2"
    settings = dict(max_steps=8, per_device_train_batch_size=2, optim="sgd", learning_rate=0.5,
                    lr_scheduler_type="linear")
    config = tiny_config("base", cache, output, **settings)
    config["training"]["use_cpu"] = False
    config_file = tmp_path / "fsdp2.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(CONFIG_DIR / "accelerate_fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
              "--main_process_port", str(29500 + random.randint(0, 2000)), "-m", "coglm_hf.training.train",
              "--config", str(config_file)]
    first = subprocess.run(launch + ["--stop-at-step", "3"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert any((output / "checkpoint-3").glob("pytorch_model_fsdp_0*"))  # sharded, one part per rank
    second = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr and "checkpoint-3" in second.stderr
    state = json.loads((output / "trainer_state.json").read_text())
    resumed = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    single = tiny_config("base", cache, tmp_path / "single", **{**settings, "per_device_train_batch_size": 4})
    single["training"]["use_cpu"] = False
    assert resumed == pytest.approx(losses(run(single)), rel=1e-3)


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(cache, tmp_path):
    from transformers import TrainerCallback

    class Preempt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_config("itersr", cache, tmp_path, max_steps=6, learning_rate=1e-3)
    trainer = build_trainer(config)
    trainer.add_callback(Preempt())
    previous = signal.getsignal(signal.SIGTERM)
    trainer.train()
    assert signal.getsignal(signal.SIGTERM) == previous  # handler restored
    stopped = trainer.state.global_step
    assert stopped in (2, 3) and (tmp_path / f"checkpoint-{stopped}").is_dir()
    finished = run(config)
    assert finished.state.global_step == 6
    assert len(losses(finished)) == 6


def test_bf16_autocast_on_cpu(cache, tmp_path):
    trainer = run(tiny_config("base", cache, tmp_path, max_steps=3, learning_rate=1e-3, bf16=True))
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_gpu(precision, cache, tmp_path):
    for stage in ("base", "dsr", "itersr"):
        config = tiny_config(stage, cache, tmp_path / stage, max_steps=20, learning_rate=1e-2,
                             activation_checkpointing=True, **{precision: True})
        config["training"]["use_cpu"] = False
        curve = losses(run(config))
        assert all(torch.isfinite(torch.tensor(curve))) and sum(curve[-3:]) / 3 < curve[0]


# ---------------------------------------------------------------------------------------------- data pipeline
@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A tiny icetk-layout text tokenizer (sentencepiece trained here) and a tiny random IceVQModel, saved."""
    import sentencepiece

    from coglm_hf.modeling_icevq import IceVQModel
    from coglm_hf.tokenization_coglm import CogLMTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    words = "a red cat sits on the mat blue dog runs in park green bird flies over tree small house".split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(200)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=40,
                                             model_type="unigram", minloglevel=2)
    (root / "sp.model").write_bytes(model.getvalue())
    text = CogLMTokenizer.from_sentencepiece(root / "sp.model", text_token_offset=64)
    text.save_pretrained(root / "text")
    torch.manual_seed(0)
    vq = IceVQModel(channels=8, z_channels=8, embedding_dim=8, num_embeddings=64, encoder_channel_mult=(1, 2),
                    encoder_num_res_blocks=1, decoder_channel_mults=((1, 1, 1, 2), (1, 1, 2), (1, 2)),
                    norm_num_groups=4, attn_resolutions=(), resolution=32, compress_rate=8).eval()
    vq.save_pretrained(root / "vq")
    return text, vq, root


def _image(size, seed):
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for i, size in enumerate([(120, 100), (96, 96), (200, 130), (100, 150)]):
        _image(size, i).save(folder / f"good{i}.png")
        (folder / f"good{i}.txt").write_text(f"a red cat sits on the mat {i}\n")
    _image((50, 40), 9).save(folder / "small.png")
    (folder / "small.txt").write_text("a blue dog")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (folder / "corrupt.txt").write_text("a green bird")
    truncated = io.BytesIO()
    _image((120, 120), 7).save(truncated, format="PNG")
    (folder / "truncated.png").write_bytes(truncated.getvalue()[:200])
    (folder / "truncated.txt").write_text("a tree")
    _image((100, 100), 8).save(folder / "empty.png")
    (folder / "empty.txt").write_text("   \n")
    _image((100, 100), 10).save(folder / "nocaption.png")
    (folder / "zh").mkdir()
    _image((128, 128), 11).save(folder / "zh" / "pair.png")
    (folder / "zh" / "pair.txt").write_text("small house")
    (folder / "zh" / "pair.zh.txt").write_text("green tree")
    return folder


def test_folder_cache_reports_bad_files_and_resumes(tokenizers, image_folder, tmp_path):
    text, vq, _ = tokenizers
    records = list(image_folder_records(image_folder, second_caption_suffix=".zh.txt"))
    report = build_token_cache(records, tmp_path / "cache", vq, text, image_size=32, hires_size=96, batch_size=3,
                               num_workers=2, progress=False)
    assert report.total == 10 and report.encoded == 5
    assert dict(report.skipped) == {"corrupt": 2, "too_small": 1, "empty_caption": 2}
    logged = [json.loads(line) for line in (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(entry["source"]).name for entry in logged) == [
        "corrupt.jpg", "empty.png", "nocaption.png", "small.png", "truncated.png"]

    dataset = TokenCacheDataset(tmp_path / "cache", require=("image_tokens", "hires_tokens"))
    assert len(dataset) == 5
    by_source = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        assert sample["image_tokens"].shape == (4, 4) and sample["hires_tokens"].shape == (12, 12)
        assert all(text.is_text_token(t) for t in sample["text_ids"])
        by_source[i] = sample
    # tokens are what the VQ model gives for the resized + center-cropped image
    good0 = Image.open(image_folder / "good0.png")
    with torch.no_grad():
        expected = vq.encode(resize_center_crop(good0, 96)[None])[0]
    assert any(torch.equal(s["hires_tokens"], expected) for s in by_source.values())
    assert sum("text_ids_2" in s for s in by_source.values()) == 1  # the bilingual pair
    assert any(s["text_ids"] == text.encode("a red cat sits on the mat 0", add_special_tokens=False)
               for s in by_source.values())

    again = build_token_cache(image_folder_records(image_folder, second_caption_suffix=".zh.txt"), tmp_path /
                              "cache", vq, text, image_size=32, hires_size=96, progress=False)
    assert again.already_cached == 5 and again.encoded == 0
    with pytest.raises(ValueError, match="px"):
        build_token_cache(records, tmp_path / "cache", vq, text, image_size=64, progress=False)


def test_hf_dataset_source(tokenizers, tmp_path):
    import datasets

    text, vq, _ = tokenizers
    good = io.BytesIO()
    _image((64, 48), 3).save(good, format="PNG")
    table = datasets.Dataset.from_dict({
        "image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"broken", "path": None},
                  {"bytes": good.getvalue(), "path": None}],
        "caption": ["a red cat", "a dog", ""],
    }).cast_column("image", datasets.Image())
    records = list(hf_dataset_records(table, text_column="caption"))
    report = build_token_cache(records, tmp_path / "cache", vq, text, image_size=32, progress=False)
    assert report.encoded == 1 and dict(report.skipped) == {"corrupt": 1, "empty_caption": 1}
    sample = TokenCacheDataset(tmp_path / "cache", require=("image_tokens",))[0]
    assert sample["image_tokens"].shape == (4, 4)
    with pytest.raises(ValueError, match="hires_tokens"):
        TokenCacheDataset(tmp_path / "cache", require=("hires_tokens",))
    with pytest.raises(ValueError, match="column"):
        next(hf_dataset_records(table, text_column="text"))


def test_cli_prepares_data_and_trains_from_a_folder(tokenizers, image_folder, tmp_path):
    _, _, root = tokenizers
    model_config = {**json.loads((CONFIG_DIR / "tiny_base.json").read_text()),
                    "boi_token_id": 104, "start_of_english_token_id": 105, "start_of_chinese_token_id": 106}
    config = {
        "stage": "base",
        "model_config": model_config,
        "data": {"cache_dir": str(tmp_path / "cache"), "image_folder": str(image_folder),
                 "vq_model": str(root / "vq"), "tokenizer": str(root / "text")},
        "collator": {"patch_size": 2},
        "training": {"output_dir": str(tmp_path / "run"), "use_cpu": True, "per_device_train_batch_size": 2,
                     "disable_tqdm": True, "activation_checkpointing": False},
    }
    config_file = tmp_path / "base.yaml"
    config_file.write_text(yaml.safe_dump(config))
    assert main(["--config", str(config_file), "--prepare-data"]) == 0
    assert len(TokenCacheDataset(tmp_path / "cache")) == 6  # base stage: 32 px suffice, so small.png is kept too
    assert main(["--config", str(config_file), "--max_steps", "2", "--learning_rate", "1e-3",
                 "--collator.caption_ratio=1.0"]) == 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


# ---------------------------------------------------------------------------------------------- configuration
def test_overrides_and_config_errors(tmp_path):
    config = apply_overrides({"training": {"output_dir": "x"}}, [
        "--learning_rate", "1e-4", "--data.cache_dir=d", "--collator.mask_ratios", "[0.5]", "--max-steps", "7",
        "--model", "m"])
    assert config["training"] == {"output_dir": "x", "learning_rate": 1e-4, "max_steps": 7}
    assert config["data"] == {"cache_dir": "d"} and config["collator"] == {"mask_ratios": [0.5]}
    assert config["model"] == "m"
    args = training_arguments(STAGES["dsr"], {"training": {"output_dir": str(tmp_path), "learning_rate": "2e-4",
                                                           "use_cpu": True}})
    assert args.learning_rate == 2e-4 and args.remove_unused_columns is False and args.activation_checkpointing
    with pytest.raises(ValueError, match="unknown TrainingArguments"):
        training_arguments(STAGES["base"], {"training": {"output_dir": "x", "learnin_rate": 1}})
    with pytest.raises(ValueError, match="output_dir"):
        training_arguments(STAGES["base"], {})
    with pytest.raises(ValueError, match="stage"):
        build_trainer({"stage": "sr", "training": {"output_dir": "x"}})
    with pytest.raises(ValueError, match="exactly one"):
        build_model(STAGES["base"], {})
    with pytest.raises(ValueError, match="needs a value"):
        apply_overrides({}, ["--max_steps"])


def test_shipped_configs_are_valid(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    names = sorted(p.name for p in CONFIG_DIR.iterdir())
    for name in ("accelerate_single_gpu.yaml", "accelerate_ddp.yaml", "accelerate_fsdp2.yaml",
                 "accelerate_deepspeed_zero2.yaml", "accelerate_deepspeed_zero3.yaml", "ds_zero2.json",
                 "ds_zero3.json", "base.yaml", "dsr.yaml", "itersr.yaml"):
        assert name in names
    fsdp = load_config_from_file(str(CONFIG_DIR / "accelerate_fsdp2.yaml"))
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "CogLMLayer"
    assert fsdp.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    for stage in (2, 3):
        assert load_config_from_file(str(CONFIG_DIR / f"accelerate_deepspeed_zero{stage}.yaml")).deepspeed_config[
            "zero_stage"] == stage
        assert json.loads((CONFIG_DIR / f"ds_zero{stage}.json").read_text())["zero_optimization"]["stage"] == stage
    for stage in ("base", "dsr", "itersr"):
        config = yaml.safe_load((CONFIG_DIR / f"{stage}.yaml").read_text())
        assert config["stage"] == stage
        config = apply_overrides(config, ["--bf16", "false", "--use_cpu", "true"])
        args = training_arguments(STAGES[stage], config)
        assert args.max_steps > 0 and args.activation_checkpointing
    # under FSDP with FSDP's own activation checkpointing the TrainingArguments one is switched off
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    args = training_arguments(STAGES["base"], {"training": {"output_dir": str(tmp_path), "use_cpu": True}})
    assert args.activation_checkpointing is False
    assert main(["--config-path", "accelerate_fsdp2.yaml"]) == 0


def test_extra_callbacks_run_and_lopar_masks_train(cache, tmp_path):
    """`run(config, callbacks)` adds callbacks to the stage's own; the demo's DSR takes the cores the iterative-SR
    process frees once it exits. The iterative-SR collator's LoPAR masks pass through the config."""
    from coglm_hf.demo.train_demo import ThreadsAfterExit

    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    config = tiny_config("itersr", cache, tmp_path, max_steps=2, learning_rate=1e-3)
    config["collator"] = {"lopar_fraction": 1.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = run(config, callbacks=[ThreadsAfterExit(finished, 2)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert trainer.state.global_step == 2 and all(map(math.isfinite, losses(trainer)))
