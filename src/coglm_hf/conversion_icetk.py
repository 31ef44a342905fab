"""Convert icetk's files (`ice_text.model`, `ice_image.pt`, CogView2's `cluster_label.npy`) into our folders.

Output layout (component folders of the CogView2 pipeline):

    <output>/tokenizer/        CogLMTokenizer (tokenizer.json, tokenizer_config.json)
    <output>/image_tokenizer/  IceVQModel (config.json, diffusion_pytorch_model.safetensors)
    <output>/scheduler/        CogView2Scheduler carrying the codebook's cluster labels (scheduler_config.json)

The image checkpoint is converted strictly: every tensor of the file is either loaded into a parameter of the
same name and shape or is one of icetk's two EMA training buffers, which are checked and dropped on purpose
(icetk itself loads with `strict=False` and silently ignores wrong names).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from .convert_sat import atomic_output_dir, check_output_dir, read_json_object
from .modeling_icevq import IceVQModel
from .scheduling_cogview2 import CogView2Scheduler
from .tokenization_coglm import CogLMTokenizer

# Persistent buffers of icetk's VectorQuantizeEMA, read only by its training update.
ICETK_TRAINING_BUFFERS = ("quantize.cluster_size", "quantize.embed_avg")
# Mean cluster size of the official table (20000 codes in 500 clusters), used when no table is given.
CODES_PER_CLUSTER = 40
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def icevq_config_from_icetk(icetk_config: Mapping) -> dict:
    """Map icetk's HVQVAE constructor arguments (the `config.json` of `fixtures/icetk_vqvae`: sections `Encoder`,
    `Decoder` (one per level, `decs.0` first), `VectorQuantizeEMA`, `HVQVAE`, optional `normalization`) to
    `IceVQModel` arguments."""
    try:
        encoder, decoders = icetk_config["Encoder"], icetk_config["Decoder"]
        quantizer = icetk_config["VectorQuantizeEMA"]
    except KeyError as error:
        raise ValueError(f"icetk config lacks the section {error}; expected Encoder, Decoder, VectorQuantizeEMA") from None
    for decoder in decoders:
        for key in ("channels", "resolution", "attn_resolutions", "in_channels", "out_channels"):
            if decoder[key] != encoder[key]:
                raise ValueError(f"decoder {key}={decoder[key]} differs from the encoder's {encoder[key]}; "
                                 "IceVQModel shares it")
    if len({d["num_res_blocks"] for d in decoders}) != 1 or len({d["z_channels"] for d in decoders}) != 1:
        raise ValueError("all icetk decoders must share num_res_blocks and z_channels")
    if quantizer["hidden_dim"] != encoder["z_channels"] or decoders[0]["z_channels"] != quantizer["embedding_dim"]:
        raise ValueError("inconsistent icetk config: VectorQuantizeEMA.hidden_dim must equal Encoder.z_channels and "
                         "Decoder.z_channels must equal VectorQuantizeEMA.embedding_dim")
    config = {
        "in_channels": encoder["in_channels"],
        "out_channels": encoder["out_channels"],
        "channels": encoder["channels"],
        "z_channels": encoder["z_channels"],
        "embedding_dim": quantizer["embedding_dim"],
        "num_embeddings": quantizer["n_embed"],
        "encoder_channel_mult": list(encoder["channels_mult"]),
        "encoder_num_res_blocks": encoder["num_res_blocks"],
        "decoder_channel_mults": [list(d["channels_mult"]) for d in decoders],
        # icetk's decoder runs num_res_blocks + 1 blocks per level, its encoder num_res_blocks
        "decoder_num_res_blocks": decoders[0]["num_res_blocks"] + 1,
        "resolution": encoder["resolution"],
        "attn_resolutions": list(encoder["attn_resolutions"]),
    }
    if "normalization" in icetk_config:
        config["image_mean"] = list(icetk_config["normalization"]["mean"])
        config["image_std"] = list(icetk_config["normalization"]["std"])
    return config


def icevq_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Read the widths of an icetk checkpoint from its tensor shapes (the level structure is icetk's fixed one)."""
    needed = ("enc.conv_in.weight", "quantize.proj.weight", "quantize.embed.weight")
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ValueError(f"not an icetk image tokenizer checkpoint: missing {missing}")
    channels, in_channels = state_dict["enc.conv_in.weight"].shape[:2]
    embedding_dim, z_channels = state_dict["quantize.proj.weight"].shape[:2]
    num_embeddings = state_dict["quantize.embed.weight"].shape[0]
    return {"in_channels": int(in_channels), "channels": int(channels), "z_channels": int(z_channels),
            "embedding_dim": int(embedding_dim), "num_embeddings": int(num_embeddings)}


def load_icetk_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load `ice_image.pt` safely (`weights_only=True`) and return its state dict (the `'module'` entry)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"icetk image checkpoint not found: {str(path)!r} (icetk's file is ice_image.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle / zip errors of arbitrary kinds
        raise ValueError(f"{str(path)!r} is not a loadable torch checkpoint ({type(error).__name__}: {error})") from None
    state_dict = checkpoint.get("module", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{str(path)!r} does not hold a state dict (expected {{'module': {{name: tensor}}}})")
    return state_dict


def convert_icetk_image_model(
    state_dict: Mapping[str, torch.Tensor], config: Mapping | None = None, dtype: torch.dtype = torch.float32
) -> IceVQModel:
    """Build an `IceVQModel` from an icetk state dict, strictly.

    Args:
        state_dict: icetk's `HVQVAE` state dict (the `'module'` entry of `ice_image.pt`).
        config: `IceVQModel` arguments; default: the official architecture with widths read from the shapes.
        dtype: dtype of the converted weights.

    Raises:
        ValueError: a tensor is missing, unexpected, or has the wrong shape (all listed).
    """
    config = dict(icevq_config_from_state_dict(state_dict) if config is None else config)
    model = IceVQModel(**config)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected and key not in ICETK_TRAINING_BUFFERS]
    mismatched = [f"{key}: checkpoint {list(state_dict[key].shape)} vs model {list(expected[key].shape)}"
                  for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    num_codes, dim = model.config.num_embeddings, model.config.embedding_dim
    buffer_shapes = {"quantize.cluster_size": [num_codes], "quantize.embed_avg": [num_codes, dim]}
    mismatched += [f"{key}: checkpoint {list(state_dict[key].shape)} vs expected {shape}"
                   for key, shape in buffer_shapes.items() if key in state_dict and list(state_dict[key].shape) != shape]
    if missing or unexpected or mismatched:
        problems = [f"{len(missing)} missing: {missing[:10]}" if missing else "",
                    f"{len(unexpected)} unexpected: {unexpected[:10]}" if unexpected else "",
                    f"{len(mismatched)} with the wrong shape: {mismatched[:10]}" if mismatched else ""]
        raise ValueError("the icetk checkpoint does not match IceVQModel(" + ", ".join(f"{k}={v}" for k, v in
                         config.items()) + "): " + "; ".join(p for p in problems if p) +
                         ". Pass the checkpoint's config (--image-config) or use an unmodified ice_image.pt.")
    # assign=True keeps the tensors' dtype (ModelMixin.to(dtype) would warn about fp32 modules we do not have)
    model.load_state_dict({key: state_dict[key].to(dtype).contiguous() for key in expected}, strict=True, assign=True)
    return model.eval()


def load_cluster_labels(path: str | os.PathLike, num_embeddings: int) -> list[int]:
    """Read CogView2's `cluster_label.npy` (one cluster id per image token) and check it fits the codebook."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster labels not found: {str(path)!r} (CogView2 ships cluster_label.npy)")
    try:
        labels = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{str(path)!r} is not a numpy .npy array: {error}") from None
    if labels.ndim != 1 or labels.shape[0] != num_embeddings or labels.dtype.kind not in "iu":
        raise ValueError(f"cluster labels must be a 1-D integer array with one entry per code ({num_embeddings}), "
                         f"got shape {labels.shape} and dtype {labels.dtype}")
    if labels.min() < 0:
        raise ValueError(f"cluster labels must be >= 0, found {labels.min()}")
    return [int(v) for v in labels]


def convert_icetk(
    text_model: str | os.PathLike,
    image_model: str | os.PathLike,
    output_dir: str | os.PathLike,
    cluster_labels: str | os.PathLike | None = None,
    num_clusters: int | None = None,
    seed: int = 0,
    image_config: Mapping | str | os.PathLike | None = None,
    text_token_offset: int | None = None,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
) -> Path:
    """Convert icetk's tokenizers into `<output_dir>/{tokenizer,image_tokenizer,scheduler}`, atomically.

    Args:
        text_model: icetk's sentencepiece model (`ice_text.model`).
        image_model: icetk's image tokenizer checkpoint (`ice_image.pt`).
        output_dir: destination; it appears only once everything is written.
        cluster_labels: `cluster_label.npy`; if `None`, labels are computed by k-means over the codebook.
        num_clusters: clusters for k-means (default: codebook size / 40, i.e. 500 for icetk); ignored with
            `cluster_labels`.
        seed: k-means seed.
        image_config: `IceVQModel` arguments or icetk's constructor arguments (dict or a JSON file, e.g. the
            fixture's `config.json`); default: the official architecture, widths read from the checkpoint.
        text_token_offset: first text id; default the codebook size (20000 for icetk).
        dtype: `"float32"`, `"float16"` or `"bfloat16"` for the image model weights.
        overwrite: replace an existing `output_dir`.

    Returns:
        The output directory.
    """
    output_dir = check_output_dir(output_dir, overwrite, [text_model, image_model, cluster_labels])
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]

    # 1. read and check everything before writing anything
    if isinstance(image_config, (str, os.PathLike)):
        image_config = read_json_object(Path(image_config))
    if image_config is not None and "Encoder" in image_config:
        image_config = icevq_config_from_icetk(image_config)
    image_tokenizer = convert_icetk_image_model(load_icetk_checkpoint(image_model), image_config, dtype)
    num_codes = image_tokenizer.config.num_embeddings
    offset = num_codes if text_token_offset is None else text_token_offset
    if offset < num_codes:
        raise ValueError(f"text_token_offset ({offset}) must be >= the codebook size ({num_codes}): text ids follow "
                         "the image ids")
    tokenizer = CogLMTokenizer.from_sentencepiece(text_model, text_token_offset=offset)
    if cluster_labels is not None:
        labels = load_cluster_labels(cluster_labels, num_codes)
    else:
        clusters = max(1, num_codes // CODES_PER_CLUSTER) if num_clusters is None else num_clusters
        labels = image_tokenizer.compute_cluster_labels(clusters, seed=seed).tolist()
    scheduler = CogView2Scheduler(cluster_labels=labels)

    # 2. write into a temporary sibling folder, then move it into place
    with atomic_output_dir(output_dir, overwrite) as staging:
        tokenizer.save_pretrained(staging / "tokenizer")
        image_tokenizer.save_pretrained(staging / "image_tokenizer", safe_serialization=True)
        scheduler.save_pretrained(staging / "scheduler")
    return output_dir


__all__ = [
    "ICETK_TRAINING_BUFFERS",
    "convert_icetk",
    "convert_icetk_image_model",
    "icevq_config_from_icetk",
    "icevq_config_from_state_dict",
    "load_cluster_labels",
    "load_icetk_checkpoint",
]
