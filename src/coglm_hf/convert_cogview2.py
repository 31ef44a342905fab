"""Convert the official CogView2 release into one complete CogView2Pipeline folder.

Inputs: the three SwissArmyTransformer model folders (``coglm``, ``cogview2-dsr``, ``cogview2-itersr``; usually
together in one SAT home folder, as folders, under the Hugging Face mirror's ``sharefs/cogview-new/`` nesting, or as
the release zips), icetk's ``ice_text.model`` and ``ice_image.pt``, and
CogView2's ``cluster_label.npy``. Output: a self-contained pipeline folder (see ``CogView2Pipeline.save_pretrained``)
with sharded safetensors in the chosen dtype, written atomically.

Every input is read and cross-checked before anything is written: the checkpoint kinds, the grids the three models
chain through, the id layout the tokenizer must follow (taken from the models' config), the codebook size and the
cluster table.

Memory: the models are built without weights; each checkpoint is memory-mapped in turn and its tensors are streamed
into safetensors shards, so the peak is about the size of the largest checkpoint file whatever the dtype.

Identical weights are stored once: a tensor with the same name and bit-identical contents in several of the three
models (e.g. a super-resolution model whose backbone was frozen from ``coglm``) is written to a shared shard
``model-shared-<hash>-…safetensors`` that each model's ``model.safetensors.index.json`` references; the copies in
the component folders are hard links to one file (byte copies where the file system has no hard links; the Hub
stores identical files once as well). Every component folder still loads on its own.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .conversion_icetk import (
    convert_icetk_image_model,
    icevq_config_from_icetk,
    load_cluster_labels,
    load_icetk_checkpoint,
)
from .convert_sat import (
    DTYPES,
    atomic_output_dir,
    build_empty_model,
    check_output_dir,
    load_sat_state_dict,
    read_json_object,
    save_converted_model,
)
from .pipeline_cogview2 import CogView2Pipeline, check_max_shard_size
from .safetensors_streaming import parse_size, plan_shards, tensor_digest, tensor_nbytes
from .scheduling_cogview2 import CogView2Scheduler
from .tokenization_coglm import CogLMTokenizer

logger = logging.getLogger(__name__)

SAT_FOLDER_NAMES = {"coglm": "coglm", "dsr": "cogview2-dsr", "itersr": "cogview2-itersr"}
MODEL_COMPONENTS = ("base_model", "dsr_model", "itersr_model")
SHARED_SHARD_PREFIX = "model-shared-"
# where the Hugging Face mirror's zips put each model folder
MIRROR_NESTING = ("sharefs", "cogview-new")


def find_sat_folder(sat_dir: Path, name: str) -> Path | None:
    """``<sat_dir>/<name>`` or the mirror's ``sharefs/cogview-new/<name>`` nesting (also inside ``<name>/``, where a
    zip was extracted into a folder of its own name); the first that holds ``latest``, else the first that exists."""
    nested = Path(*MIRROR_NESTING, name)
    candidates = [sat_dir / name, sat_dir / nested, sat_dir / name / nested]
    for folder in candidates:
        if (folder / "latest").is_file():
            return folder
    return next((folder for folder in candidates if folder.is_dir()), None)


def extract_sat_zip(archive: Path, name: str, scratch: Path) -> Path:
    """Extract the three files the converter reads from a release zip (``<name>.zip``) into ``scratch/<name>``.

    Member data are streamed to disk (a deflated member cannot be memory-mapped inside the zip).
    """
    try:
        with zipfile.ZipFile(archive) as release:
            members = set(release.namelist())
            trackers = sorted((m for m in members if m == f"{name}/latest" or m.endswith(f"/{name}/latest")), key=len)
            if not trackers:
                raise FileNotFoundError(f"{archive} holds no {name}/latest: it is not the {name} release zip")
            prefix = trackers[0][: -len("latest")]
            iteration = release.read(trackers[0]).decode().strip()
            weights = f"{prefix}{iteration}/mp_rank_00_model_states.pt"
            if weights not in members:
                raise FileNotFoundError(f"{archive} has no {weights} (named by {trackers[0]}): the zip is incomplete; "
                                        "download it again")
            target = scratch / name
            for member in (trackers[0], f"{prefix}model_config.json", weights):
                if member not in members:
                    continue
                path = target / member[len(prefix):]
                path.parent.mkdir(parents=True, exist_ok=True)
                with release.open(member) as source, open(path, "wb") as sink:
                    shutil.copyfileobj(source, sink, 16 * 2**20)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise ValueError(f"{archive} is damaged or not a zip file ({error}); download it again") from error
    return target


@contextmanager
def sat_model_folders(sat_dir: str | os.PathLike | None, folders: dict[str, str | os.PathLike | None],
                      scratch_parent: Path) -> Iterator[dict[str, Path]]:
    """The three SAT model folders as the release ships them: given one by one, or found in ``sat_dir`` as folders
    (``coglm/``, ``cogview2-dsr/``, ``cogview2-itersr/``, possibly under ``sharefs/cogview-new/``) or as the
    zips ``coglm.zip``, ``cogview2-dsr.zip``, ``cogview2-itersr.zip`` (extracted into a scratch folder in
    ``scratch_parent`` that is removed afterwards)."""
    scratch = None
    try:
        found = {}
        for kind, name in SAT_FOLDER_NAMES.items():
            if folders.get(kind) is not None:
                found[kind] = Path(folders[kind])
                continue
            if sat_dir is None:
                raise ValueError(f"give sat_dir (the folder holding {', '.join(SAT_FOLDER_NAMES.values())}) or "
                                 f"the {name} folder itself")
            sat_dir = Path(sat_dir)
            if not sat_dir.is_dir():
                raise FileNotFoundError(f"SAT folder not found: {sat_dir}")
            folder = find_sat_folder(sat_dir, name)
            if folder is None and (sat_dir / f"{name}.zip").is_file():
                if scratch is None:
                    scratch_parent.mkdir(parents=True, exist_ok=True)
                    scratch = Path(tempfile.mkdtemp(prefix=".coglm-hf-unzip-", dir=scratch_parent))
                folder = extract_sat_zip(sat_dir / f"{name}.zip", name, scratch)
            if folder is None:
                raise FileNotFoundError(
                    f"the {name} model was not found in {sat_dir}: looked for {name}/, "
                    f"{'/'.join(MIRROR_NESTING)}/{name}/ and {name}.zip (all three of "
                    f"{', '.join(SAT_FOLDER_NAMES.values())} are needed)")
            found[kind] = folder
        yield found
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _check_models(base, dsr, itersr) -> None:
    """The three models must share the id layout and chain their grids (20 → 60 → 60)."""
    layout = ("vocab_size", "num_image_tokens", "text_token_offset", "boi_token_id", "start_of_english_token_id",
              "start_of_chinese_token_id")
    for name, model in (("cogview2-dsr", dsr), ("cogview2-itersr", itersr)):
        for field in layout:
            if getattr(model.config, field) != getattr(base.config, field):
                raise ValueError(f"{name} has {field}={getattr(model.config, field)} but coglm has "
                                 f"{getattr(base.config, field)}; the three checkpoints must come from one release")
    if dsr.config.image_grid_size != base.config.image_grid_size:
        raise ValueError(f"cogview2-dsr upsamples a {dsr.config.image_grid_size}² grid but coglm generates "
                         f"{base.config.image_grid_size}²")
    if itersr.config.hires_grid_size != dsr.config.hires_grid_size:
        raise ValueError(f"cogview2-itersr works on {itersr.config.hires_grid_size}² but cogview2-dsr produces "
                         f"{dsr.config.hires_grid_size}²")


def convert_cogview2(
    output_dir: str | os.PathLike,
    sat_dir: str | os.PathLike | None = None,
    coglm_dir: str | os.PathLike | None = None,
    dsr_dir: str | os.PathLike | None = None,
    itersr_dir: str | os.PathLike | None = None,
    cluster_labels: str | os.PathLike | None = None,
    text_model: str | os.PathLike | None = None,
    image_model: str | os.PathLike | None = None,
    image_config: str | os.PathLike | dict | None = None,
    dtype: str = "float32",
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    deduplicate: bool = True,
) -> Path:
    """Convert the official CogView2 files into a pipeline folder loadable with `CogView2Pipeline.from_pretrained`.

    Args:
        output_dir: the pipeline folder to write (appears only when complete).
        sat_dir: a SAT home folder holding `coglm/`, `cogview2-dsr/` and `cogview2-itersr/`; or give each with
            `coglm_dir`, `dsr_dir`, `itersr_dir` (they override `sat_dir`).
        cluster_labels: CogView2's `cluster_label.npy` (required: stage 1 and direct SR sample by cluster).
        text_model: icetk's `ice_text.model`; without it the pipeline has no tokenizer (use `prompt_ids`).
        image_model: icetk's `ice_image.pt`; without it the pipeline has no image tokenizer
            (`output_type="tokens"` only, no editing).
        image_config: `IceVQModel` arguments or icetk's HVQVAE constructor arguments (dict or JSON file) for a
            non-official image tokenizer; default: the official architecture with widths read from the weights.
        dtype: `float32`, `float16` or `bfloat16` for every model's weights.
        max_shard_size: largest safetensors shard, e.g. `"5GB"`.
        overwrite: replace an existing `output_dir`.
        deduplicate: store bit-identical tensors shared by the three models once (see the module docstring).

    Raises:
        FileNotFoundError: an input is missing. FileExistsError: `output_dir` exists without `overwrite`.
        ValueError: inputs that do not fit together (kinds, grids, id layout, codebook size, cluster table).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if cluster_labels is None:
        raise ValueError("cluster_labels is required: CogView2's cluster_label.npy (one cluster id per image token)")
    check_max_shard_size(max_shard_size)
    output_dir = check_output_dir(output_dir, overwrite, [sat_dir, coglm_dir, dsr_dir, itersr_dir, cluster_labels,
                                                          text_model, image_model])
    torch_dtype = DTYPES[dtype]
    given = {"coglm": coglm_dir, "dsr": dsr_dir, "itersr": itersr_dir}
    with sat_model_folders(sat_dir, given, output_dir.absolute().parent) as folders:
        check_output_dir(output_dir, overwrite, folders.values())  # the model folders found in sat_dir
        # 1. read and check every input before writing anything (one checkpoint in memory at a time)
        models, digests = {}, {}
        for kind, folder in folders.items():
            models[kind], digests[kind] = _inspect_sat_model(folder, kind, torch_dtype if deduplicate else None)
        base, dsr, itersr = models["coglm"], models["dsr"], models["itersr"]
        _check_models(base, dsr, itersr)
        config = base.config
        scheduler = CogView2Scheduler(cluster_labels=load_cluster_labels(cluster_labels, config.num_image_tokens))
        tokenizer = None
        if text_model is not None:
            tokenizer = CogLMTokenizer.from_sentencepiece(
                text_model,
                text_token_offset=config.text_token_offset,
                boi_token_id=config.boi_token_id,
                start_of_english_token_id=config.start_of_english_token_id,
                start_of_chinese_token_id=config.start_of_chinese_token_id,
            )
        image_tokenizer = None
        if image_model is not None:
            if isinstance(image_config, (str, os.PathLike)):
                image_config = read_json_object(Path(image_config))
            if image_config is not None and "Encoder" in image_config:
                image_config = icevq_config_from_icetk(image_config)
            image_tokenizer = convert_icetk_image_model(load_icetk_checkpoint(image_model), image_config, torch_dtype)
            codes = image_tokenizer.config.num_embeddings
            if codes != config.num_image_tokens:
                raise ValueError(f"the image tokenizer has {codes} codes but the CogLM models use "
                                 f"{config.num_image_tokens} image ids; convert the matching ice_image.pt")

        # 2. the models were built without weights: each one's save streams its tensors from its checkpoint
        shared = plan_shared_files(digests, max_shard_size) if deduplicate else {}
        written: dict[str, Path] = {}
        for kind, model in models.items():
            model.save_pretrained = _streaming_save(model, folders[kind], torch_dtype, shared.get(kind), written)
        pipeline = CogView2Pipeline(tokenizer=tokenizer, image_tokenizer=image_tokenizer, base_model=base,
                                    dsr_model=dsr, itersr_model=itersr, scheduler=scheduler)

        # 3. write to a temporary sibling folder, then move it into place
        with atomic_output_dir(output_dir, overwrite) as staging:
            folder = staging / "pipeline"
            pipeline.save_pretrained(folder, max_shard_size=max_shard_size)
            for path in folder.iterdir():
                os.replace(path, staging / path.name)
            folder.rmdir()
    if shared:
        logger.info("stored %d tensors shared by several models once", _count_shared(shared))
    return output_dir


def _inspect_sat_model(folder: Path, expected_kind: str, digest_dtype) -> tuple:
    """The weightless model for one SAT folder (kind checked) and, with ``digest_dtype``, its tensors' digests
    and sizes in that dtype (``{key: (digest, nbytes)}``)."""
    state_dict, model_config, _ = load_sat_state_dict(folder)
    model, kind, converted = build_empty_model(state_dict, model_config)
    if kind != expected_kind:
        raise ValueError(f"{folder} holds a {SAT_FOLDER_NAMES[kind]} checkpoint but the "
                         f"{SAT_FOLDER_NAMES[expected_kind]} one was expected there; check which folder you passed "
                         "for which model")
    if digest_dtype is None:
        return model, {}
    return model, {key: (tensor_digest(t, digest_dtype), tensor_nbytes(t, digest_dtype)) for key, t in converted.items()}


def _streaming_save(model, folder: Path, dtype, shared_files, written: dict[str, Path]):
    """A ``save_pretrained`` for ``model`` (built without weights) that streams them from the SAT ``folder``."""

    def save_pretrained(save_directory, max_shard_size: int | str = "5GB", **_):
        state_dict, model_config, _ = load_sat_state_dict(folder)
        converted = build_empty_model(state_dict, model_config)[2]
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        save_converted_model(model, converted, save_directory, dtype, max_shard_size, shared_files=shared_files,
                             written=written)

    return save_pretrained


def plan_shared_files(digests: dict[str, dict[str, tuple[str, int]]], max_shard_size: int | str
                      ) -> dict[str, dict[str, list[str]]]:
    """Which tensors go into shared shards: ``{model: {shared file name: [tensor names]}}``.

    A tensor with the same name and bit-identical contents in several models goes into
    ``model-shared-<hash>-<i>-of-<n>.safetensors`` shards of the set of models that share it; those files are
    byte-identical in each of them (one file, hard-linked).
    """
    owners: dict[tuple[str, str], list[str]] = defaultdict(list)
    sizes: dict[str, int] = {}
    for model, tensors in digests.items():
        for key, (digest, nbytes) in tensors.items():
            owners[(key, digest)].append(model)
            sizes[key] = nbytes
    groups: dict[tuple[str, ...], list[str]] = defaultdict(list)  # sharing set -> tensor names
    for (key, _), models in owners.items():
        if len(models) > 1:
            groups[tuple(models)].append(key)
    plan: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for members, keys in sorted(groups.items()):
        tag = hashlib.sha256("|".join(SAT_FOLDER_NAMES[m] for m in members).encode()).hexdigest()[:8]
        parts = plan_shards(sorted(keys), sizes, parse_size(max_shard_size))
        for index, part in enumerate(parts, start=1):
            file_name = f"{SHARED_SHARD_PREFIX}{tag}-{index:05d}-of-{len(parts):05d}.safetensors"
            for member in members:
                plan[member][file_name] = part
    return dict(plan)


def _count_shared(plan: dict[str, dict[str, list[str]]]) -> int:
    """Tensors stored once instead of several times."""
    holders = Counter(file_name for files in plan.values() for file_name in files)
    keys = {file_name: names for files in plan.values() for file_name, names in files.items()}
    return sum(len(keys[file_name]) * (count - 1) for file_name, count in holders.items())


__all__ = ["SAT_FOLDER_NAMES", "convert_cogview2", "find_sat_folder", "plan_shared_files", "sat_model_folders"]
