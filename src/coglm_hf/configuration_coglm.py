"""Configuration of the CogLM backbone and the two CogView2 super-resolution models.

This file ships with every converted checkpoint (remote code): it imports nothing beyond ``transformers``.
"""

from __future__ import annotations

import math
import os

from transformers import PreTrainedConfig


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_local_folder(name_or_path) -> None:
    """Raise ``FileNotFoundError`` for a local path that does not exist (absolute, ``./``, ``../``, ``~`` or more
    than one ``/``): otherwise the Hub client reports it as an invalid repo id."""
    text = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else None
    if text is None or os.path.exists(os.path.expanduser(text)):
        return
    if os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text:
        raise FileNotFoundError(f"folder not found: {text}; check the path (it is not a Hub repo id either)")


class CogLMConfig(PreTrainedConfig):
    r"""Configuration of CogLM, the CogView2 backbone (defaults: the official 6B ``coglm`` checkpoint).

    Every id, position offset and grid size CogView2 relies on lives here, so that small models can use small
    vocabularies and grids.

    Id layout (icetk): image ids ``[0, num_image_tokens)``, text ids ``[text_token_offset, boi_token_id)``,
    then ``<start_of_image>`` (``boi_token_id``), ``<start_of_english>``, ``<start_of_chinese>``; rows up to
    ``vocab_size`` are padding.

    Position layout: text ``0 … L-1``, ``<start_of_image>`` at ``boi_position_id`` (512), the stage-1 image grid
    (``image_grid_size``², raster order) at ``boi_position_id + 1 …``. The super-resolution models add a second
    table of ``hires_grid_size``² rows addressed by ids ``hires_position_offset + j`` (1024 + j).

    Args:
        vocab_size: rows of the (tied) word embedding.
        hidden_size: model width.
        num_hidden_layers: transformer layers.
        num_attention_heads: heads; ``hidden_size`` must be divisible by it.
        intermediate_size: MLP width (4 × hidden in CogView2).
        max_position_embeddings: rows of the base position table.
        layer_norm_eps: epsilon of every LayerNorm.
        hidden_act: MLP activation (tanh-approximated GELU).
        initializer_range: std of the normal init of linear and embedding weights.
        attention_dropout, hidden_dropout: dropout probabilities (0 at inference).
        num_image_tokens: size of the VQ codebook; image ids are ``[0, num_image_tokens)``.
        text_token_offset: first text id (sentencepiece id + offset).
        boi_token_id, start_of_english_token_id, start_of_chinese_token_id: special ids.
        pad_token_id: id placed in padding slots of the SR layouts (masked out, never attended).
        bos_token_id, eos_token_id: ``None``: CogView2 has no begin/end-of-sequence token (stage 1 always generates
            a full grid; ``generate`` stops at ``max_new_tokens`` unless you pass an ``eos_token_id``).
        boi_position_id: position of ``<start_of_image>``; the image grid follows it.
        image_grid_size: side of the stage-1 token grid (20).
        text_attention_bias: constant ``c`` added to attention scores on text keys (1.4 in the official inference code).
        max_text_length: longest prompt (tokens, without ``<start_of_image>``) stage 1 accepts.
        hires_grid_size: side of the super-resolution grid (60); 0 for the base model.
        hires_position_offset: position id of the first hi-res cell (1024).
        local_window: (rows, cols) of the hi-res local window (9 × 5).
        cross_window: (rows, cols) of the low-res window hi-res queries see in direct SR (5 × 5).
        sr_text_slots: text slots of the SR layout (96 for direct SR, 16 for iterative SR).
    """

    model_type = "coglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    _auto_class = "AutoConfig"  # saved folders carry this file as remote code

    vocab_size: int = 150010
    hidden_size: int = 3072
    num_hidden_layers: int = 48
    num_attention_heads: int = 48
    intermediate_size: int = 12288
    max_position_embeddings: int = 1024
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_pytorch_tanh"
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    tie_word_embeddings: bool = True
    use_cache: bool = True
    num_image_tokens: int = 20000
    text_token_offset: int = 20000
    boi_token_id: int = 150000
    start_of_english_token_id: int = 150001
    start_of_chinese_token_id: int = 150002
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    boi_position_id: int = 512
    image_grid_size: int = 20
    text_attention_bias: float = 1.4
    max_text_length: int = 109
    hires_grid_size: int = 0
    hires_position_offset: int = 1024
    local_window: list[int] | tuple[int, int] = (9, 5)
    cross_window: list[int] | tuple[int, int] = (5, 5)
    sr_text_slots: int = 0

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``PreTrainedConfig.from_pretrained``; a local path that does not exist is a ``FileNotFoundError``."""
        check_local_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __post_init__(self, **kwargs):
        self._check_field_types()
        self.local_window = tuple(self.local_window)
        self.cross_window = tuple(self.cross_window)
        super().__post_init__(**kwargs)
        self.validate()

    def _check_field_types(self) -> None:
        """Raise ``TypeError`` naming a field whose value has the wrong type (``hidden_size="32"``, a float window
        ``(5.6, 3)``, a NaN bias), before anything converts or compares it."""
        annotations = {}
        for cls in reversed(type(self).__mro__):
            if isinstance(cls, type) and issubclass(cls, CogLMConfig):
                annotations.update(vars(cls).get("__annotations__", {}))
        for name, annotation in annotations.items():
            value = getattr(self, name, None)
            kind = str(annotation).replace(" ", "")
            if kind == "int|None" and value is None:
                continue
            if kind in ("int", "int|None") and not _is_int(value):
                raise TypeError(f"Invalid {type(self).__name__}: {name} must be an integer, got {value!r}")
            if kind == "float" and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and math.isfinite(value)):
                raise TypeError(f"Invalid {type(self).__name__}: {name} must be a finite number, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise TypeError(f"Invalid {type(self).__name__}: {name} must be True or False, got {value!r}")
            if kind == "str" and not isinstance(value, str):
                raise TypeError(f"Invalid {type(self).__name__}: {name} must be a string, got {value!r}")
            if kind.startswith("list[int]") and not (
                isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)
            ):
                raise TypeError(f"Invalid {type(self).__name__}: {name} must be two integers (rows, cols), got "
                                f"{value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_positions(self) -> int:
        return self.image_grid_size * self.image_grid_size

    @property
    def num_hires_positions(self) -> int:
        return self.hires_grid_size * self.hires_grid_size

    @property
    def sr_scale(self) -> int:
        """Ratio between the hi-res and the low-res grid (3 in CogView2)."""
        return self.hires_grid_size // self.image_grid_size if self.hires_grid_size else 0

    def is_text_token(self, ids):
        """Boolean mask of text ids (works on tensors and ints): ``text_token_offset <= id < boi_token_id``."""
        return (ids >= self.text_token_offset) & (ids < self.boi_token_id)

    def validate(self) -> None:
        """Check sizes and id layout; raise ``ValueError`` naming the field and the fix."""

        def fail(msg: str):
            raise ValueError(f"Invalid CogLMConfig: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings", "num_image_tokens", "image_grid_size"):
            if int(getattr(self, name)) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            fail(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                 f"({self.num_attention_heads})")
        if not self.num_image_tokens <= self.text_token_offset < self.boi_token_id:
            fail(f"need num_image_tokens ({self.num_image_tokens}) <= text_token_offset ({self.text_token_offset})"
                 f" < boi_token_id ({self.boi_token_id})")
        specials = (self.boi_token_id, self.start_of_english_token_id, self.start_of_chinese_token_id)
        if len(set(specials)) != 3 or max(specials) >= self.vocab_size:
            fail(f"special ids {specials} must be distinct and below vocab_size ({self.vocab_size})")
        last_image_position = self.boi_position_id + self.num_image_positions
        if last_image_position >= self.max_position_embeddings:
            fail(f"the image grid needs positions up to {last_image_position} but the table has "
                 f"max_position_embeddings={self.max_position_embeddings}; raise it or shrink image_grid_size")
        if self.max_text_length > self.boi_position_id:
            fail(f"max_text_length ({self.max_text_length}) must not exceed boi_position_id ({self.boi_position_id})")
        for name in ("local_window", "cross_window"):
            window = getattr(self, name)
            if len(window) != 2 or any(v <= 0 or v % 2 == 0 for v in window):
                fail(f"{name} must be two positive odd sizes (rows, cols), got {window}")
        if self.hires_grid_size:
            if self.hires_grid_size % self.image_grid_size:
                fail(f"hires_grid_size ({self.hires_grid_size}) must be a multiple of image_grid_size "
                     f"({self.image_grid_size})")
            if self.hires_position_offset < self.max_position_embeddings:
                fail(f"hires_position_offset ({self.hires_position_offset}) must be >= max_position_embeddings "
                     f"({self.max_position_embeddings}) so that hi-res ids address the extra table")
        if not 0.0 <= self.attention_dropout < 1.0 or not 0.0 <= self.hidden_dropout < 1.0:
            fail("dropout probabilities must be in [0, 1)")


class CogLMDirectSRConfig(CogLMConfig):
    """Configuration of :class:`CogLMForDirectSuperResolution` (20×20 → 60×60 in one pass, official ``cogview2-dsr``).

    Same backbone fields as :class:`CogLMConfig`; the layout is ``sr_text_slots`` left-padded text slots, the
    ``image_grid_size``² low-res tokens, then ``hires_grid_size``² hi-res placeholders.
    """

    model_type = "coglm_dsr"

    hires_grid_size: int = 60
    sr_text_slots: int = 96

    def validate(self) -> None:
        super().validate()
        if not self.hires_grid_size or self.sr_text_slots <= 0:
            raise ValueError("Invalid CogLMDirectSRConfig: hires_grid_size and sr_text_slots must be positive")


class CogLMIterativeSRConfig(CogLMConfig):
    """Configuration of :class:`CogLMForIterativeSuperResolution` (LoPAR, official ``cogview2-itersr``).

    Layout: ``sr_text_slots`` (16) left-padded text slots visible to every image query, then the
    ``hires_grid_size``² image cells; ``<start_of_image>`` marks the cells to regenerate.
    """

    model_type = "coglm_itersr"

    hires_grid_size: int = 60
    sr_text_slots: int = 16

    def validate(self) -> None:
        super().validate()
        if not self.hires_grid_size or self.sr_text_slots <= 0:
            raise ValueError("Invalid CogLMIterativeSRConfig: hires_grid_size and sr_text_slots must be positive")


__all__ = ["CogLMConfig", "CogLMDirectSRConfig", "CogLMIterativeSRConfig", "check_local_folder"]
