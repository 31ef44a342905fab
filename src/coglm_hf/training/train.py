"""Trainer entry point for the three CogView2 stages.

    python -m coglm_hf.training.train --stage base --config base.yaml [--max_steps 1000] [--data.cache_dir DIR]
    accelerate launch --config_file accelerate_fsdp2.yaml -m coglm_hf.training.train --stage dsr --config dsr.yaml

A config (YAML or JSON) has these sections; every field can be overridden on the command line, plain names for
``TrainingArguments`` fields (``--learning_rate 1e-4``) and dotted names for the other sections
(``--data.cache_dir DIR``, ``--collator.caption_ratio 0.3``, ``--model PATH``)::

    stage: base | dsr | itersr
    model: folder of a pretrained model of the stage         # or
    model_config: JSON file (or mapping) for a fresh model
    init_from_base: folder of a CogLM base model             # SR stages: start from the base weights (optional)
    hires_position_init: tile | interpolate                  # with init_from_base: the hi-res position table
    trainable_parameters: [substrings] | all                 # default: the stage's paper choice
    model_dtype: float32                                     # master weights (mixed precision via bf16/fp16 flags)
    resume_from_checkpoint: true | false | PATH              # true: the last checkpoint in output_dir, if any
    stop_at_step: null                                       # save and stop after this step (resume later)
    data:      {cache_dir, eval_cache_dir, image_folder | hf_dataset, vq_model, tokenizer, ...}
    collator:  keyword arguments of the stage's collator (seed defaults to training.seed)
    training:  TrainingArguments fields

Stage defaults (the paper's choices): the base stage trains everything on the pretraining mixture; direct SR trains only
the hi-res attention (``hires_query_key_value``, ``hires_dense``) and the hi-res position table, the backbone
frozen; iterative SR finetunes everything on the masked-cell objective.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..configuration_coglm import CogLMConfig, CogLMDirectSRConfig, CogLMIterativeSRConfig
from ..modeling_coglm import CogLMForMaskedRegions
from ..modeling_coglm_sr import CogLMForDirectSuperResolution, CogLMForIterativeSuperResolution
from ..tokenization_coglm import CogLMTokenizer
from . import CONFIG_DIR, config_path
from .collators import CogLMDirectSRCollator, CogLMIterativeSRCollator, CogLMPretrainingCollator
from .data import (
    INFO_FILE,
    TokenCacheDataset,
    build_token_cache,
    hf_dataset_records,
    image_folder_records,
    stage_image_sizes,
)

logger = logging.getLogger(__name__)

# Applied to every stage unless the config sets them.
COMMON_TRAINING_DEFAULTS: dict = {
    "remove_unused_columns": False,  # the collators need every field of the samples
    "activation_checkpointing": True,  # 6B models: recompute layer activations in the backward pass
    "ddp_find_unused_parameters": False,  # every trainable parameter is used in every forward pass
    "lr_scheduler_type": "cosine",
    "warmup_steps": 100,
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "logging_steps": 10,
    "save_steps": 500,
    "save_total_limit": 3,
    "report_to": "none",
    "seed": 42,
}


@dataclass(frozen=True)
class StageSpec:
    """What differs between stages: model class, config class, collator, cached grids, trainable parameters."""

    name: str
    model_class: type[PreTrainedModel]
    config_class: type[CogLMConfig]
    collator_class: type
    grids: tuple[str, ...]
    trainable: tuple[str, ...] | None  # parameter-name substrings; None = every parameter
    training_defaults: dict = field(default_factory=dict)


STAGES: dict[str, StageSpec] = {
    "base": StageSpec(
        "base", CogLMForMaskedRegions, CogLMConfig, CogLMPretrainingCollator, ("image_tokens",), None,
        {"learning_rate": 5e-5},
    ),
    "dsr": StageSpec(
        "dsr", CogLMForDirectSuperResolution, CogLMDirectSRConfig, CogLMDirectSRCollator,
        ("image_tokens", "hires_tokens"), ("hires_query_key_value", "hires_dense", "hires_position_embeddings"),
        {"learning_rate": 1e-4},
    ),
    "itersr": StageSpec(
        "itersr", CogLMForIterativeSuperResolution, CogLMIterativeSRConfig, CogLMIterativeSRCollator,
        ("hires_tokens",), None, {"learning_rate": 5e-5},
    ),
}


# ------------------------------------------------------------------------------------------------ configuration
def load_config(path: str | os.PathLike) -> dict:
    """Read a YAML or JSON config file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found (shipped examples: {CONFIG_DIR})")
    text = path.read_text()
    try:
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a mapping of sections (stage, model, data, collator, training)")
    return config


TOP_LEVEL_KEYS = frozenset({
    "stage", "model", "model_config", "init_from_base", "hires_position_init", "trainable_parameters", "model_dtype",
    "attn_implementation", "resume_from_checkpoint", "stop_at_step", "data", "collator", "training", "prepare_data_only",
})
DATA_KEYS = frozenset({
    "cache_dir", "eval_cache_dir", "update_cache", "image_folder", "caption_suffix", "second_caption_suffix",
    "hf_dataset", "hf_split", "image_column", "text_column", "second_text_column", "vq_model", "tokenizer",
    "image_size", "hires_size", "min_image_size", "encode_batch_size", "decode_workers",
})


def _unknown_keys_message(where: str, unknown: list[str], known) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=1)
        if close:
            hints.append(f"{key!r} → {close[0]!r}?")
    return f"unknown {where} {unknown}" + (f" (did you mean {', '.join(hints)})" if hints else "")


def validate_config(config: dict) -> None:
    """Refuse keys the trainer would silently ignore: unknown top-level keys (a ``TrainingArguments`` field belongs
    under ``training:``), unknown ``data:`` keys, sections that are not mappings and unknown collator arguments."""
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        training_fields = {f.name for f in fields(TrainingArguments)}
        misplaced = [key for key in unknown if key in training_fields]
        hint = (f"; {misplaced} are TrainingArguments fields: put them under training: (or pass --{misplaced[0]} "
                "VALUE)" if misplaced else "")
        raise ValueError(_unknown_keys_message("config keys", unknown, TOP_LEVEL_KEYS) + hint
                         + f"; known keys: {sorted(TOP_LEVEL_KEYS)}")
    for section in ("data", "collator", "training"):
        if config.get(section) is not None and not isinstance(config[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping of fields, got {config[section]!r}")
    unknown = sorted(set(config.get("data") or {}) - DATA_KEYS)
    if unknown:
        raise ValueError(_unknown_keys_message("data: keys", unknown, DATA_KEYS) + f"; known: {sorted(DATA_KEYS)}")
    stage = STAGES.get(config.get("stage"))
    if stage is not None and config.get("collator"):
        accepted = set(inspect.signature(stage.collator_class).parameters) - {"config", "self"}
        unknown = sorted(set(config["collator"]) - accepted)
        if unknown:
            raise ValueError(_unknown_keys_message(f"collator: keys for stage {stage.name}", unknown, accepted)
                             + f"; {stage.collator_class.__name__} accepts {sorted(accepted)}")


def _parse_value(text: str):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``--key value`` / ``--key=value`` pairs: dotted keys address a section (``data.cache_dir``), top-level
    keys of the config format are set as such, any other plain key is a ``TrainingArguments`` field."""
    config = json.loads(json.dumps(config))  # deep copy
    top_level = TOP_LEVEL_KEYS
    index = 0
    while index < len(overrides):
        item = overrides[index]
        if not item.startswith("--"):
            raise ValueError(f"unexpected argument {item!r}; overrides look like --max_steps 100 or --data.cache_dir=d")
        key, has_value, value = item[2:].partition("=")
        if not has_value:
            if index + 1 >= len(overrides) or overrides[index + 1].startswith("--"):
                raise ValueError(f"override --{key} needs a value")
            index += 1
            value = overrides[index]
        key = key.replace("-", "_")
        section, _, name = key.rpartition(".")
        if not section and key not in top_level:
            section, name = "training", key
        target = config
        for part in section.split(".") if section else []:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"cannot set {key}: {part} is not a section")
        target[name] = _parse_value(value)
        index += 1
    return config


def _coerce_training_values(values: dict) -> dict:
    """Turn numeric strings into numbers for numeric ``TrainingArguments`` fields (YAML reads 1e-4 as a str)."""
    types = {f.name: str(f.type) for f in fields(TrainingArguments)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"unknown TrainingArguments fields in the training section: {unknown}")
    coerced = {}
    for key, value in values.items():
        if isinstance(value, str) and ("float" in types[key] or "int" in types[key]):
            try:
                value = int(value) if "int" in types[key] and value.lstrip("-").isdigit() else float(value)
            except ValueError:
                pass
        coerced[key] = value
    return coerced


def training_arguments(stage: StageSpec, config: dict) -> TrainingArguments:
    """``TrainingArguments`` = common defaults ← stage defaults ← the config's ``training`` section."""
    explicit = config.get("training") or {}
    values = {**COMMON_TRAINING_DEFAULTS, **stage.training_defaults, **explicit}
    values.pop("resume_from_checkpoint", None)  # handled by run(), see resolve_checkpoint
    fsdp_checkpointing = (
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"
    ) or bool((values.get("fsdp_config") or {}).get("activation_checkpointing"))
    if fsdp_checkpointing and "activation_checkpointing" not in explicit:
        values["activation_checkpointing"] = False  # FSDP checkpoints the wrapped layers itself
    if not values.get("output_dir"):
        raise ValueError("set training.output_dir (or --output_dir DIR): checkpoints and the final model go there")
    return TrainingArguments(**_coerce_training_values(values))


# ------------------------------------------------------------------------------------------------ model
def _load_json_or_mapping(value) -> dict:
    if isinstance(value, dict):
        return dict(value)
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"model_config {str(path)!r} not found (a JSON file of config fields)")
    return json.loads(path.read_text())


HIRES_POSITION_INITS = ("tile", "interpolate")


@torch.no_grad()
def init_from_base(model: PreTrainedModel, base_path: str | os.PathLike, hires_positions: str = "tile") -> None:
    """Initialise a super-resolution model from a CogLM base model (what CogView2 did before SR training).

    Copies every backbone weight of matching name and shape, the base attention into the hi-res attention of direct
    SR (``hires_query_key_value``/``hires_dense``), and fills the hi-res position table by tiling the stage-1 image
    rows periodically: cell ``(R, C)`` gets base row ``boi_position_id + 1 + (R mod g)·g + (C mod g)`` (the released
    code tiled from row ``boi_position_id``, one row early: image positions start at ``boi_position_id + 1``; here the image rows are used).

    ``hires_positions="interpolate"`` instead resamples the stage-1 image rows bilinearly onto the hi-res grid, so
    that every hi-res cell starts near the position of the stage-1 cell it refines. With the periodic tiling, cell
    ``(R, C)`` starts as stage-1 cell ``(R mod g, C mod g)``, unrelated to the region it covers, and a small model
    trained briefly keeps most of that start (measured on the demo family: after 2500 direct-SR steps the hi-res
    rows still had cosine 0.92 with their tiled start, 0.39 with the other cells of their block).
    """
    if hires_positions not in HIRES_POSITION_INITS:
        raise ValueError(f"hires_position_init must be one of {HIRES_POSITION_INITS}, got {hires_positions!r}")
    base = CogLMForMaskedRegions.from_pretrained(base_path, dtype=torch.float32)
    config, base_config = model.config, base.config
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "image_grid_size", "boi_position_id"):
        if getattr(config, name) != getattr(base_config, name):
            raise ValueError(f"init_from_base: {name} differs (model {getattr(config, name)}, base "
                             f"{getattr(base_config, name)}); the base model must have the same backbone")
    source = base.state_dict()
    target = model.state_dict()
    copied = 0
    for name, tensor in target.items():
        origin = name.replace("hires_query_key_value", "query_key_value").replace("hires_dense", "dense")
        if origin in source and source[origin].shape == tensor.shape:
            tensor.copy_(source[origin])
            copied += 1
    grid, hires = config.image_grid_size, config.hires_grid_size
    image_rows = base.transformer.position_embeddings.weight[config.boi_position_id + 1:][: grid * grid]
    if hires_positions == "tile":
        rows = torch.arange(hires)[:, None] % grid * grid + torch.arange(hires)[None, :] % grid
        table = image_rows[rows.reshape(-1)]
    else:
        planes = image_rows.T.reshape(1, -1, grid, grid)
        table = F.interpolate(planes, size=(hires, hires), mode="bilinear", align_corners=False)[0].flatten(1).T
    model.transformer.hires_position_embeddings.weight.copy_(table)
    logger.info("init_from_base: copied %d tensors from %s; hi-res position table: %s", copied, base_path,
                hires_positions)


def set_trainable(model: PreTrainedModel, patterns: tuple[str, ...] | None) -> tuple[int, int]:
    """Train only parameters whose name contains one of ``patterns`` (None = all). Returns (trainable, total)."""
    matched = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(patterns is None or any(p in name for p in patterns))
        matched += parameter.requires_grad
    if not matched:
        raise ValueError(f"trainable_parameters {list(patterns or [])} match no parameter of "
                         f"{type(model).__name__}; use names like 'hires_dense' or 'all'")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def build_model(stage: StageSpec, config: dict, seed: int = 42) -> PreTrainedModel:
    """The stage's model from ``model`` (pretrained folder) or ``model_config`` (fresh), plus ``init_from_base``
    and the trainable-parameter selection."""
    path, fresh = config.get("model") or None, config.get("model_config")
    if (path is None) == (fresh is None):
        raise ValueError("set exactly one of model (a pretrained folder) and model_config (a JSON for a fresh model)")
    dtype = getattr(torch, str(config.get("model_dtype", "float32")))
    extra = {"attn_implementation": config["attn_implementation"]} if config.get("attn_implementation") else {}
    if path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"model folder {str(path)!r} not found (convert the official checkpoint first)")
        model = stage.model_class.from_pretrained(path, dtype=dtype, **extra)
    else:
        model_config = stage.config_class(**_load_json_or_mapping(fresh), **extra)
        set_seed(seed)
        model = stage.model_class(model_config).to(dtype)
    if not isinstance(model.config, stage.config_class):
        raise ValueError(f"{path} holds a {type(model.config).__name__}, stage {stage.name} needs "
                         f"{stage.config_class.__name__}; for SR training from a base model use init_from_base")
    if "hires_position_init" in config and not config.get("init_from_base"):
        raise ValueError("hires_position_init only applies with init_from_base (a fresh SR model started from a base "
                         "model); remove it or set init_from_base")
    if config.get("init_from_base"):
        if stage.name == "base":
            raise ValueError("init_from_base is for the SR stages; for the base stage use model: PATH")
        init_from_base(model, config["init_from_base"], config.get("hires_position_init", "tile"))
    patterns = config.get("trainable_parameters", stage.trainable)
    if patterns == "all":
        patterns = None
    trainable, total = set_trainable(model, tuple(patterns) if patterns is not None else None)
    logger.info("stage %s: training %d of %d parameters (%.1f%%)", stage.name, trainable, total, 100 * trainable / total)
    return model


# ------------------------------------------------------------------------------------------------ data
def prepare_token_cache(stage: StageSpec, data: dict, model_config: CogLMConfig, device: torch.device | None = None):
    """Build (or extend) ``data.cache_dir`` from ``data.image_folder`` or ``data.hf_dataset``. Returns the report."""
    from ..modeling_icevq import IceVQModel

    if not (data.get("image_folder") or data.get("hf_dataset")):
        raise ValueError("building the token cache needs data.image_folder or data.hf_dataset")
    for name in ("vq_model", "tokenizer"):
        if not data.get(name):
            raise ValueError(f"building the token cache needs data.{name} (a local folder)")
    if data.get("image_folder"):
        records = image_folder_records(data["image_folder"], data.get("caption_suffix", ".txt"),
                                       data.get("second_caption_suffix"))
        total = None
    else:
        import datasets

        source = data["hf_dataset"]
        if Path(source).is_dir() and (Path(source) / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(source)
        else:
            dataset = datasets.load_dataset(source, split=data.get("hf_split", "train"))
        records = hf_dataset_records(dataset, data.get("image_column", "image"), data.get("text_column", "text"),
                                     data.get("second_text_column"))
        total = len(dataset)
    vq = IceVQModel.from_pretrained(data["vq_model"]).eval()
    if device is not None:
        vq.to(device)
    tokenizer = CogLMTokenizer.from_pretrained(data["tokenizer"])
    image_size, hires_size = stage_image_sizes(model_config, int(vq.config.compress_rate), stage.name)
    return build_token_cache(
        records, data["cache_dir"], vq, tokenizer,
        image_size=data.get("image_size", image_size), hires_size=data.get("hires_size", hires_size),
        min_image_size=data.get("min_image_size"), batch_size=int(data.get("encode_batch_size", 16)),
        num_workers=int(data.get("decode_workers", 4)), total=total,
    )


def build_datasets(stage: StageSpec, config: dict, model_config: CogLMConfig, args: TrainingArguments):
    """Train (and optional eval) :class:`TokenCacheDataset`. When a source is configured the cache is built first if
    it does not exist yet (or extended with ``data.update_cache: true``), on the main process while the others wait.
    """
    data = config.get("data") or {}
    if not data.get("cache_dir"):
        raise ValueError("set data.cache_dir (the token cache; built from data.image_folder / data.hf_dataset)")
    has_cache = (Path(data["cache_dir"]) / INFO_FILE).is_file()
    if (data.get("image_folder") or data.get("hf_dataset")) and (not has_cache or data.get("update_cache")):
        with args.main_process_first(local=False, desc="building the token cache"):
            if args.process_index == 0:
                prepare_token_cache(stage, data, model_config, device=args.device)
    train = TokenCacheDataset(data["cache_dir"], require=stage.grids)
    evaluation = TokenCacheDataset(data["eval_cache_dir"], require=stage.grids) if data.get("eval_cache_dir") else None
    return train, evaluation


# ------------------------------------------------------------------------------------------------ callbacks
class SetEpochCallback(TrainerCallback):
    """Tell the datasets the epoch before each epoch's dataloader starts, so the collators' per-sample random
    choices (seeded by seed, epoch and index) change between epochs and survive a resume."""

    def __init__(self, *datasets):
        self.datasets = [d for d in datasets if d is not None]

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = int(math.floor((state.epoch or 0) + 1e-6))
        for dataset in self.datasets:
            dataset.set_epoch(epoch)


class StopAtStepCallback(TrainerCallback):
    """Save a checkpoint and stop after ``step`` optimizer steps (same step on every rank): a planned interruption
    whose run continues with ``resume_from_checkpoint``."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = control.should_log = control.should_training_stop = True
        return control


class GracefulStopCallback(TrainerCallback):
    """On SIGTERM/SIGINT (preemption, Ctrl-C) finish the current step, save a checkpoint and stop. The flag is
    reduced across ranks so every rank stops at the same step; a second signal kills as usual."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signals = signals
        self.previous = {}

    def _handler(self, signum, frame):
        self.requested = True
        logger.warning("signal %d received: saving a checkpoint after this step", signum)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave the default behaviour
                pass

    def on_step_end(self, args, state, control, **kwargs):
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(float(requested), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = bool(flag.item())
        if requested:
            control.should_save = control.should_log = control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


# ------------------------------------------------------------------------------------------------ trainer
def _checkpoint_is_complete(folder: Path) -> bool:
    """The Trainer writes ``trainer_state.json`` last: a checkpoint without a readable one was cut short."""
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def resolve_checkpoint(value, output_dir: str) -> str | None:
    """``true`` → the last complete ``checkpoint-N`` in ``output_dir`` (None when there is none; checkpoints cut
    short by a kill are skipped with a warning), ``false`` → None, a path → itself (must be a complete
    checkpoint)."""
    if value in (None, False):
        return None
    if value is True:
        if not Path(output_dir).is_dir():
            return None
        checkpoints = [p for p in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                       if p.is_dir() and p.name.rpartition("-")[2].isdigit()]
        for checkpoint in sorted(checkpoints, key=lambda p: int(p.name.rpartition("-")[2]), reverse=True):
            if _checkpoint_is_complete(checkpoint):
                return str(checkpoint)
            logger.warning("skipping %s: incomplete (no %s; the run was stopped while saving it)", checkpoint,
                           TRAINER_STATE_NAME)
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"resume_from_checkpoint must be true, false or a checkpoint folder, got {value!r}")
    if not Path(value).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {value!r} does not exist")
    if not _checkpoint_is_complete(Path(value)):
        raise ValueError(f"{value} is an incomplete checkpoint (no readable {TRAINER_STATE_NAME}: the run was stopped "
                         "while saving it); resume from an earlier checkpoint or with --resume true")
    return str(value)


def build_trainer(config: dict, callbacks: list[TrainerCallback] | None = None) -> Trainer:
    """Model, datasets, collator, ``TrainingArguments`` and callbacks of one stage as a ``Trainer``; ``callbacks``
    are added to the stage's own."""
    validate_config(config)
    stage_name = config.get("stage")
    if stage_name not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {stage_name!r} (--stage)")
    stage = STAGES[stage_name]
    args = training_arguments(stage, config)
    model = build_model(stage, config, seed=args.seed)
    train_dataset, eval_dataset = build_datasets(stage, config, model.config, args)
    collator_kwargs = {"seed": args.seed, **(config.get("collator") or {})}
    if stage.name == "base" and "chinese_piece_start" not in collator_kwargs:
        tokenizer = (config.get("data") or {}).get("tokenizer")
        start = CogLMTokenizer.from_pretrained(tokenizer).chinese_piece_start if tokenizer else None
        if start is not None:  # a tokenizer laid out English first says where its Chinese pieces start
            collator_kwargs["chinese_piece_start"] = start
    collator = stage.collator_class(model.config, **collator_kwargs)
    # the eval set keeps epoch 0: the same masks at every evaluation
    callbacks = [SetEpochCallback(train_dataset), GracefulStopCallback(), *(callbacks or [])]
    if config.get("stop_at_step"):
        callbacks.append(StopAtStepCallback(int(config["stop_at_step"])))
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
    )
    # The models normalise the summed loss by `num_items_in_batch`; without it gradient accumulation and
    # multi-process training would average per micro-batch (Trainer's default for models without loss kwargs).
    if not trainer.model_accepts_loss_kwargs:
        raise RuntimeError(f"{type(model).__name__} does not accept num_items_in_batch; the loss would be mis-scaled")
    return trainer


def run(config: dict, callbacks: list[TrainerCallback] | None = None):
    """Train one stage as configured (``callbacks``: extra ``TrainerCallback``s). Returns the ``Trainer`` after
    training (state, log history, model)."""
    trainer = build_trainer(config, callbacks)
    resume = resolve_checkpoint(config.get("resume_from_checkpoint", True), trainer.args.output_dir)
    if resume:
        logger.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    state = trainer.state
    if state.max_steps and state.global_step < state.max_steps:
        logger.warning("stopped at step %d of %d; run the same command again to resume from the last checkpoint",
                       state.global_step, state.max_steps)
    else:
        if trainer.is_fsdp_enabled:  # checkpoints stay sharded; the final model is one consolidated folder
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()
        trainer.save_state()
    return trainer


def parse_args(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="python -m coglm_hf.training.train",
        description="Train a CogView2 stage. Unknown --key value pairs override config fields "
        "(plain keys: TrainingArguments; dotted keys: data./collator.).",
    )
    parser.add_argument("--stage", choices=sorted(STAGES), help="base | dsr | itersr (overrides the config)")
    parser.add_argument("--config", help="YAML/JSON config file")
    parser.add_argument("--model", help="folder of a pretrained model of the stage")
    parser.add_argument("--model-config", dest="model_config", help="JSON config of a fresh model")
    parser.add_argument("--init-from-base", dest="init_from_base", help="SR stages: initialise from a base model")
    parser.add_argument("--resume", dest="resume_from_checkpoint", default=None,
                        help="'true' (last checkpoint in output_dir, the default), 'false', or a checkpoint folder")
    parser.add_argument("--stop-at-step", dest="stop_at_step", type=int, help="save and stop after this step")
    parser.add_argument("--prepare-data", action="store_true", help="only build the token cache, then exit")
    parser.add_argument("--config-path", help="print the path of a shipped config file and exit")
    args, overrides = parser.parse_known_args(argv)
    if args.config_path:
        print(config_path(args.config_path))
        return {}
    config = load_config(args.config) if args.config else {}
    config = apply_overrides(config, overrides)
    for key in ("stage", "model", "model_config", "init_from_base", "stop_at_step"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.model:
        config.pop("model_config", None)
    if args.model_config:
        config.pop("model", None)
    if args.resume_from_checkpoint is not None:
        config["resume_from_checkpoint"] = _parse_value(args.resume_from_checkpoint)
    config["prepare_data_only"] = args.prepare_data
    return config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    config = parse_args(argv)
    if not config:
        return 0
    validate_config(config)  # also before --prepare-data, which does not build a Trainer
    if config.pop("prepare_data_only", False):
        stage = STAGES[config.get("stage", "")] if config.get("stage") in STAGES else None
        if stage is None:
            raise ValueError(f"stage must be one of {sorted(STAGES)} (--stage)")
        model_config = (stage.config_class(**_load_json_or_mapping(config["model_config"])) if config.get("model_config")
                        else stage.config_class.from_pretrained(config["model"]))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        report = prepare_token_cache(stage, config.get("data") or {}, model_config, device=device)
        print(report.summary())
        return 0
    try:
        run(config)
    finally:
        # tear the process group down before interpreter exit: a gloo group left to the atexit path can abort one
        # rank ("terminate called without an active exception") after a run that finished or stopped cleanly
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
