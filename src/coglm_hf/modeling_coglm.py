"""CogLM, the CogView2 backbone, as a Transformers model.

One backbone serves every CogView2 stage: a sandwich-LayerNorm transformer with learned absolute positions and a
tied output head. Only the attention pattern differs between stages, so the layer takes its attention module as a
constructor argument and the pattern (masks, local windows) comes in through the forward arguments:

* :class:`CogLMForMaskedRegions`: stage 1 (text→image), caption scoring and CogLM training — Eq. 1 masks built
  from ``mask_regions`` plus the text-attention bias ``c`` on text keys, through Transformers' attention interface
  (``eager``, ``sdpa``, ``flex_attention``).
* the super-resolution models (``modeling_coglm_sr.py``) reuse :class:`CogLMModel` with local-attention modules.

This file ships as remote code: it imports only torch, transformers and sibling files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, can_return_tuple, is_torchdynamo_compiling

from .attention_masks import (
    batch_masked_regions_mask,
    caption_scoring_position_ids,
    caption_scoring_regions,
    masked_regions_loss_mask,
    packed_segment_ids,
    segments_from_cu_seq_lens,
)
from .configuration_coglm import CogLMConfig, check_local_folder


@dataclass
class CogLMModelOutput(ModelOutput):
    """Output of :class:`CogLMModel`.

    Args:
        last_hidden_state: ``[batch, seq, hidden]`` after the final LayerNorm.
        past_key_values: the updated cache when ``use_cache``.
        hidden_states: per-layer inputs (and final output) when ``output_hidden_states``.
        attentions: per-layer attention probabilities when the implementation returns them (``eager``).
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CogLMOutput(ModelOutput):
    """Output of the CogLM heads.

    Args:
        loss: mean (or ``num_items_in_batch``-normalised) next-token loss over the scored positions.
        logits: ``[batch, seq, vocab]`` (``[batch, seq, num_image_tokens]`` in fp32 with ``image_logits_only``).
        past_key_values, hidden_states, attentions: as in :class:`CogLMModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook attention. ``query``/``key``/``value``: ``[batch, heads, tokens, head_dim]``; the additive
    ``attention_mask`` ``[batch, 1, q, k]`` carries both the mask and the text bias. Returns ``[batch, q, heads, d]``."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, probs


class CogLMAttention(nn.Module):
    """Multi-head self-attention with CogView2's fused ``query_key_value`` projection.

    The query is multiplied by ``head_dim**-0.5`` *before* ``Q·Kᵀ`` (the official order, friendlier to fp16), and
    the kernel is looked up in Transformers' attention interface, so ``eager``, ``sdpa`` and ``flex_attention`` work.
    """

    def __init__(self, config: CogLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False  # the mask is always explicit (Eq. 1), never SDPA's own causal flag
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[batch, seq, hidden]`` → three ``[batch, heads, seq, head_dim]`` tensors (q, k, v thirds of the fusion)."""
        batch, seq, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch, seq, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return query, key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        query, key, value = self.project_qkv(hidden_states)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        output, weights = self.attend(query, key, value, attention_mask, **kwargs)
        return self.dense(output), weights

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense attention through the configured implementation; ``[batch, heads, q, d]`` inputs →
        ``([batch, q, hidden], weights)``. The query is scaled before the product, as in the official code."""
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, weights = attention_interface(
            self,
            query * self.scaling,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=1.0,
            **kwargs,
        )
        return output.reshape(*output.shape[:2], -1), weights


class CogLMMLP(nn.Module):
    def __init__(self, config: CogLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden_states)))


class CogLMLayer(GradientCheckpointingLayer):
    """Sandwich-LayerNorm layer: ``x + LN3(Attn(LN_in x))``, then ``h + LN4(MLP(LN_post h))``.

    ``attention_class`` selects the attention pattern (full attention for stage 1, local attention for SR) so the
    layer itself has no stage-specific branches.
    """

    def __init__(self, config: CogLMConfig, layer_idx: int, attention_class: type[nn.Module] = CogLMAttention):
        super().__init__()
        eps = config.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = attention_class(config, layer_idx)
        self.third_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = CogLMMLP(config)
        self.fourth_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor, **attention_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_output, weights = self.attention(self.input_layernorm(hidden_states), **attention_kwargs)
        hidden_states = hidden_states + self.dropout(self.third_layernorm(attention_output))
        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        hidden_states = hidden_states + self.dropout(self.fourth_layernorm(mlp_output))
        return hidden_states, weights


class CogLMPreTrainedModel(PreTrainedModel):
    config: CogLMConfig
    config_class = CogLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogLMLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Remote code: every Auto class a saved folder should answer to (merged into ``config.auto_map`` on save).
    _remote_auto_map: dict[str, str] = {
        "AutoConfig": "configuration_coglm.CogLMConfig",
        "AutoModel": "modeling_coglm.CogLMModel",
        "AutoModelForMaskedLM": "modeling_coglm.CogLMForMaskedRegions",
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``PreTrainedModel.from_pretrained``; a local path that does not exist is a ``FileNotFoundError``
        (instead of the Hub client's repo-id error)."""
        check_local_folder(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        push_to_hub: bool = False,
        max_shard_size: int | str = "50GB",
        variant: str | None = None,
        **kwargs,
    ):
        """Save weights (safetensors), config and the model's source files, with ``auto_map`` entries for every Auto
        class so the folder loads with ``trust_remote_code=True`` where coglm_hf is not installed.

        The parameters are spelled out (not ``*args``) because Diffusers' pipeline ``save_pretrained`` forwards
        ``variant`` and ``max_shard_size`` only to components whose signature names them.
        """
        self.config.auto_map = dict(self._remote_auto_map)
        return super().save_pretrained(
            save_directory,
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            max_shard_size=max_shard_size,
            variant=variant,
            **kwargs,
        )


class _TextKeyRecord:
    """What both CogLM cache layers do alike to their ``text_keys`` record when the cache reorders or moves keys."""

    text_keys: torch.Tensor | None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.text_keys is not None:
            self.text_keys = self.text_keys.index_select(0, beam_idx.to(self.text_keys.device))

    def offload(self):
        super().offload()
        if self.text_keys is not None:
            self.text_keys = self.text_keys.to("cpu", non_blocking=True)

    def prefetch(self):
        super().prefetch()
        if self.text_keys is not None and self.text_keys.device != self.device:
            self.text_keys = self.text_keys.to(self.device, non_blocking=True)


class CogLMDynamicCacheLayer(_TextKeyRecord, DynamicLayer):
    """A :class:`DynamicLayer` that also records which cached keys are text (``text_keys`` ``[batch, seq]`` bool).

    The text-attention bias ``c`` applies to text *keys*, including the cached ones, so the cache must remember them.
    Keeping the record inside a cache layer lets every cache edit ``generate`` performs (``crop`` for assisted
    decoding, ``reorder_cache`` for beam search, ``batch_repeat_interleave``, ``batch_select_indices``, ``reset``)
    apply to it exactly as to the keys. CogLM keeps it in layer 0 (see :func:`text_key_record_layer`).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.text_keys: torch.Tensor | None = None

    def update_text_keys(self, text_keys: torch.Tensor) -> torch.Tensor:
        """Append ``[batch, q]`` flags of the new tokens; return the flags of every key ``[batch, past + q]``."""
        self.text_keys = text_keys if self.text_keys is None else torch.cat([self.text_keys, text_keys], dim=1)
        return self.text_keys

    def reset(self) -> None:
        super().reset()
        self.text_keys = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.text_keys is not None and tokens_to_remove < 0:
            self.text_keys = self.text_keys[:, :tokens_to_remove]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.text_keys is not None:
            self.text_keys = self.text_keys.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.text_keys is not None:
            self.text_keys = self.text_keys[indices]


class CogLMStaticCacheLayer(_TextKeyRecord, StaticLayer):
    """A :class:`StaticLayer` with a preallocated text-key record ``[batch, max_cache_len]`` written in place (the
    static, ``torch.compile``-friendly counterpart of :class:`CogLMDynamicCacheLayer`)."""

    def __init__(self, max_cache_len: int, **kwargs):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self.text_keys: torch.Tensor | None = None

    def update_text_keys(self, text_keys: torch.Tensor) -> torch.Tensor:
        """Write ``[batch, q]`` flags at the next free slots (before the layer's keys are written); return the whole
        record ``[batch, max_cache_len]`` (free slots are False and hidden by the mask)."""
        if self.text_keys is None:
            self.text_keys = torch.zeros(
                text_keys.shape[0], self.max_cache_len, dtype=torch.bool, device=text_keys.device
            )
            if not is_torchdynamo_compiling():
                torch._dynamo.mark_static_address(self.text_keys)
        slots = torch.arange(text_keys.shape[1], device=text_keys.device) + self.cumulative_length.to(
            text_keys.device
        )
        self.text_keys.index_copy_(1, slots, text_keys)
        return self.text_keys

    def reset(self) -> None:
        super().reset()
        if self.text_keys is not None:
            self.text_keys.zero_()


def text_key_record_layer(cache: Cache) -> CogLMDynamicCacheLayer | CogLMStaticCacheLayer:
    """Layer 0 of ``cache``, the layer that carries CogLM's text-key record.

    A fresh cache (``DynamicCache(config=...)``, ``DynamicCache()``, ``StaticCache(config=..., max_cache_len=...)``,
    or the one ``generate`` builds) gets a CogLM layer 0 here, holding the same state as the standard layer it
    replaces; nothing else about the cache changes.

    Raises:
        ValueError: the cache already holds tokens but no text-key record (it was not filled by CogLM), or its
            layer type cannot carry the record.
    """
    if not cache.layers and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layers.append(CogLMDynamicCacheLayer())
    layer = cache.layers[0] if cache.layers else None
    if isinstance(layer, (CogLMDynamicCacheLayer, CogLMStaticCacheLayer)):
        return layer
    if type(layer) not in (DynamicLayer, StaticLayer):
        raise ValueError(
            f"CogLM keeps which cached keys are text in layer 0 of the cache; a {type(layer).__name__} cannot carry "
            "it. Use DynamicCache(config=model.config) or StaticCache(config=model.config, max_cache_len=...)"
        )
    if layer.get_seq_length() != 0:
        raise ValueError(
            "this cache already holds tokens that were not encoded by CogLM (its text-key record is missing); start "
            "from an empty DynamicCache/StaticCache"
        )
    if type(layer) is StaticLayer:
        upgraded = CogLMStaticCacheLayer(max_cache_len=layer.max_cache_len)
    else:
        upgraded = CogLMDynamicCacheLayer()
    text_keys = upgraded.text_keys
    upgraded.__dict__.update(layer.__dict__)  # same keys/values buffers, lengths and flags
    upgraded.text_keys = text_keys
    cache.layers[0] = upgraded
    return upgraded


def broadcast_prompt_cache(cache: Cache, batch_size: int) -> Cache:
    """Repeat a batch-1 prompt cache to ``batch_size`` rows in place (DynamicCache and StaticCache).

    Stage 1 encodes the prompt once and shares it across every image of the batch. Call it before a compiled
    decoding loop (inside one, the model would broadcast on its first step and recompile).
    """
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.shape[0] == batch_size:
            continue
        if keys.shape[0] != 1:
            raise ValueError(f"cannot broadcast a cache of batch {keys.shape[0]} to batch {batch_size}; only 1 → N")
        layer.keys = layer.keys.expand(batch_size, *keys.shape[1:]).contiguous()
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:]).contiguous()
        text_keys = getattr(layer, "text_keys", None)
        if text_keys is not None:
            layer.text_keys = text_keys.expand(batch_size, -1).contiguous()
        if isinstance(layer, StaticLayer):
            layer.batch_size = batch_size
            if not is_torchdynamo_compiling():
                for tensor in (layer.keys, layer.values, getattr(layer, "text_keys", None)):
                    if tensor is not None:
                        torch._dynamo.mark_static_address(tensor)
    return cache


def format_attention_mask(
    visible: torch.Tensor, bias: torch.Tensor | None, config: CogLMConfig, dtype: torch.dtype
) -> tuple[object, dict]:
    """Turn a bool visibility ``[batch, q, k]`` (True = may attend) and an optional additive key bias
    ``[batch, 1, k]`` into the mask format of ``config._attn_implementation`` plus extra attention kwargs.

    ``eager``/``sdpa``: one additive mask ``[batch, 1, q, k]`` — the bias on visible keys, the dtype's minimum on
    hidden ones (the official −10000 fill and −inf give the same softmax when a row sees any key).
    ``flex_attention``: a ``BlockMask`` (fully hidden blocks are skipped) and the bias as ``position_bias``
    ``[batch, heads, q, k]`` (a broadcast view).
    """
    batch, query_length, kv_length = visible.shape
    if config._attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q_idx, kv_idx):
            return visible[b, q_idx, kv_idx]

        block_mask = create_block_mask(mask_mod, batch, None, query_length, kv_length, device=visible.device)
        extra = {}
        if bias is not None:
            extra["position_bias"] = bias[:, None].expand(batch, config.num_attention_heads, query_length, kv_length)
        return block_mask, extra
    shown = torch.zeros((), dtype=dtype, device=visible.device) if bias is None else bias.to(dtype)
    hidden = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=visible.device)
    return torch.where(visible, shown, hidden)[:, None], {}


def _cache_batch_size(cache: Cache) -> int | None:
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            return keys.shape[0]
    return None


class CogLMModel(CogLMPreTrainedModel):
    """The bare CogLM transformer: embeddings, layers, final LayerNorm (no head).

    Positions below ``max_position_embeddings`` read ``position_embeddings``; when the config has a hi-res grid
    (super-resolution models) ids from ``hires_position_offset`` on read ``hires_position_embeddings``.
    """

    _auto_class = "AutoModel"
    _can_compile_fullgraph = True

    def __init__(self, config: CogLMConfig, attention_class: type[nn.Module] = CogLMAttention):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        if config.num_hires_positions:
            self.hires_position_embeddings = nn.Embedding(config.num_hires_positions, config.hidden_size)
        else:
            self.hires_position_embeddings = None
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(
            [CogLMLayer(config, i, attention_class) for i in range(config.num_hidden_layers)]
        )
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    # ----------------------------------------------------------------------------------------------- inputs
    def check_inputs(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor) -> None:
        """Raise ``ValueError`` for ids beyond the vocabulary or positions beyond both position tables."""
        if is_torchdynamo_compiling():
            return
        config = self.config
        if input_ids is not None and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= config.vocab_size:
                raise ValueError(
                    f"input_ids must be in [0, vocab_size={config.vocab_size}); got values in [{low}, {high}]. "
                    "Replace placeholders (e.g. -1) by real ids before the forward pass."
                )
        if position_ids.numel():
            low, high = int(position_ids.min()), int(position_ids.max())
            in_base = position_ids < config.max_position_embeddings
            in_hires = (position_ids >= config.hires_position_offset) & (
                position_ids < config.hires_position_offset + config.num_hires_positions
            )
            if low < 0 or not bool((in_base | in_hires).all()):
                allowed = f"[0, {config.max_position_embeddings})"
                if config.num_hires_positions:
                    end = config.hires_position_offset + config.num_hires_positions
                    allowed += f" or [{config.hires_position_offset}, {end})"
                raise ValueError(
                    f"position_ids must lie in {allowed}; got values in [{low}, {high}]. The position table has "
                    f"{config.max_position_embeddings} rows: check the layout (text 0…L-1, <start_of_image> at "
                    f"{config.boi_position_id}, image tokens after it)."
                )

    def embed(
        self, input_ids: torch.Tensor | None, position_ids: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Word embedding (or the given ``inputs_embeds``) + learned absolute position embedding (no scaling, no
        embedding norm): ``[batch, seq, hidden]``."""
        self.check_inputs(input_ids, position_ids)
        positions = self.position_embeddings(position_ids.clamp(max=self.config.max_position_embeddings - 1))
        if self.hires_position_embeddings is not None:
            hires_ids = position_ids - self.config.hires_position_offset
            hires = self.hires_position_embeddings(hires_ids.clamp(min=0, max=self.config.num_hires_positions - 1))
            positions = torch.where((hires_ids >= 0)[..., None], hires, positions)
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        return self.embedding_dropout(inputs_embeds + positions)

    # ----------------------------------------------------------------------------------------------- masks
    def build_attention_mask(
        self,
        batch: int,
        query_length: int,
        past_length: int | torch.Tensor,
        kv_length: int,
        attention_mask: torch.Tensor | None,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None,
        text_attention_bias: float,
        text_keys: torch.Tensor,
        dtype: torch.dtype,
        device: torch.device,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The attention mask (see :func:`format_attention_mask`) with ``c`` on visible text keys, plus extra
        attention kwargs.

        Visibility, from the first of:

        * a ready mask ``[batch, q, k]`` / ``[batch, 1, q, k]`` (batch may be 1; ``k`` = past + new tokens, or the
          StaticCache length) in Transformers' conventions: bool True = attend; float additive (0 = attend, the
          dtype's minimum = masked; other values are added to the scores); integer 0/1 = hidden/visible;
        * Eq. 1 from ``mask_regions``;
        * causal, restricted to each packed sequence when ``segment_ids`` ``[batch, q]`` is given.

        A 2D ``[batch, past + q]`` mask marks padded keys (0 = padding) and combines with any of these.
        """
        total_length = past_length + query_length
        padding = None
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise ValueError(
                f"attention_mask must be a tensor, got {type(attention_mask).__name__}; CogLM builds its own "
                "BlockMask for flex_attention from a bool, float or 0/1 mask"
            )
        if attention_mask is not None and attention_mask.dim() == 2:
            padding, attention_mask = attention_mask.to(device) != 0, None
            if not is_torchdynamo_compiling() and padding.shape[1] not in (total_length, kv_length):
                raise ValueError(
                    f"a 2D attention_mask is a key padding mask and must be [batch, past + new tokens] = "
                    f"[{batch}, {int(total_length)}], got {list(padding.shape)}; pass a [q, k] mask as 3D or 4D"
                )
            padding = F.pad(padding, (0, kv_length - padding.shape[1]), value=False)

        additive = None
        if attention_mask is not None:
            if mask_regions is not None:
                raise ValueError("pass either mask_regions or a ready attention_mask, not both")
            mask = attention_mask.to(device)
            if mask.dim() == 4:
                if mask.shape[1] != 1:
                    raise ValueError(f"a 4D attention_mask must be [batch, 1, q, k], got {list(mask.shape)}")
                mask = mask[:, 0]
            if mask.dim() != 3 or mask.shape[-2] != query_length or mask.shape[-1] not in (total_length, kv_length):
                raise ValueError(
                    f"attention_mask must be [batch, q, k] or [batch, 1, q, k] with q={query_length} new tokens and "
                    f"k={int(total_length)} keys (or the StaticCache length {kv_length}); got "
                    f"{list(attention_mask.shape)}"
                )
            if mask.is_floating_point():
                # Transformers' additive convention: anything at or near the dtype minimum (or -inf) is masked
                visible = mask > torch.finfo(mask.dtype).min / 2
                additive = torch.where(visible, mask, torch.zeros((), dtype=mask.dtype, device=device))
            else:
                visible = mask != 0  # bool True / integer 1 = may attend
            width = kv_length - visible.shape[-1]
            visible = F.pad(visible, (0, width), value=False).expand(batch, -1, -1)
            if additive is not None:
                additive = F.pad(additive, (0, width))
        elif mask_regions is not None:
            if len(mask_regions) != batch:
                raise ValueError(
                    f"mask_regions needs one list of (l, r) regions per sample: got {len(mask_regions)} lists for "
                    f"batch {batch}"
                )
            past = int(past_length)
            visible = batch_masked_regions_mask(past + query_length, mask_regions, device=device)[:, past:]
            visible = F.pad(visible, (0, kv_length - past - query_length), value=False)
        else:
            query_index = torch.arange(query_length, device=device)[:, None]
            key_index = torch.arange(kv_length, device=device)[None, :]
            visible = (key_index <= query_index + past_length)[None].expand(batch, -1, -1)
            if segment_ids is not None:  # packed sequences (no cache): causal inside each sequence only
                visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
        if padding is not None:
            visible = visible & padding[:, None, :]

        bias = text_keys[:, None, :].to(dtype) * text_attention_bias
        if additive is not None:
            bias = bias + additive.to(dtype)
        return format_attention_mask(visible, bias, self.config, dtype)

    # ----------------------------------------------------------------------------------------------- forward
    def run_layers(
        self,
        hidden_states: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        **attention_kwargs,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        """Apply every layer (with any attention pattern passed through ``attention_kwargs``) and the final norm."""
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            hidden_states, weights = layer(hidden_states, **attention_kwargs)
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden, all_attentions

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None = None,
        text_attention_bias: float | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> CogLMModelOutput:
        r"""
        Args:
            input_ids: ``[batch, q]`` token ids (image ids, text ids, specials).
            position_ids: ``[q]`` or ``[batch, q]``; defaults to ``past … past+q-1``. CogView2 layouts need their own
                (see :mod:`coglm_hf.attention_masks`). Without a cache, mask or regions, a position that does not
                increase starts a new packed sequence (padding-free batches): tokens attend within their sequence.
            attention_mask: a ready mask ``[batch, q, k]`` / ``[batch, 1, q, k]`` (bool True = attend; float additive,
                0 = attend and the dtype's minimum = masked; integer 0/1), or a ``[batch, k]`` key padding mask.
            mask_regions: per sample, inclusive ``(l, r)`` regions of Eq. 1 (absolute indices in the full sequence,
                cached tokens included). Without it and without a mask the model is causal.
            text_attention_bias: ``c`` added to scores on text keys (ids in ``[text_token_offset, boi_token_id)``);
                defaults to ``config.text_attention_bias``; 0 turns it off.
            past_key_values: a ``DynamicCache``/``StaticCache``; a batch-1 prompt cache is broadcast to the batch.
                CogLM records in it which cached keys are text (layer 0, see :func:`text_key_record_layer`).
            inputs_embeds: ``[batch, q, hidden]`` word embeddings instead of ``input_ids`` (positions are still
                added). The text bias needs the ids: pass ``input_ids`` too to keep it, else no new key counts as text.
            kwargs: attention kwargs; ``cu_seq_lens_q`` (flash-attention style boundaries of a packed batch of
                one row) isolates the packed sequences like position resets do.
        """
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
        if input_ids is not None and isinstance(input_ids, torch.Tensor) and (
            input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool
        ):
            raise TypeError(f"input_ids must be an integer tensor of token ids, got {input_ids.dtype}; convert it "
                            "with .long()")
        if inputs_embeds is None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
                raise ValueError("input_ids must be a [batch, seq] LongTensor (or pass inputs_embeds)")
            batch, query_length = input_ids.shape
            device = input_ids.device
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
                raise ValueError(
                    f"inputs_embeds must be [batch, seq, hidden_size={config.hidden_size}], got "
                    f"{list(inputs_embeds.shape)}"
                )
            batch, query_length = inputs_embeds.shape[:2]
            device = inputs_embeds.device
            if input_ids is not None and input_ids.shape != (batch, query_length):
                raise ValueError(
                    f"input_ids {list(input_ids.shape)} given with inputs_embeds must match them "
                    f"[{batch}, {query_length}] (they only mark the text keys)"
                )
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)

        if input_ids is not None:
            text_keys = config.is_text_token(input_ids)
        else:
            text_keys = torch.zeros(batch, query_length, dtype=torch.bool, device=device)
        past_length = 0
        kv_length = query_length
        if past_key_values is not None:
            past_length = past_key_values.get_seq_length()
            if not is_torchdynamo_compiling():
                past_length = int(past_length)
                cached_batch = _cache_batch_size(past_key_values)
                if past_length and cached_batch == 1 and batch > 1:
                    broadcast_prompt_cache(past_key_values, batch)
                elif past_length and cached_batch not in (None, batch):
                    raise ValueError(f"the cache holds batch {cached_batch} but the input has batch {batch}")
            record = text_key_record_layer(past_key_values)
            if not is_torchdynamo_compiling() and isinstance(record, CogLMDynamicCacheLayer):
                recorded = 0 if record.text_keys is None else record.text_keys.shape[1]
                if recorded != past_length:
                    raise ValueError(
                        f"the cache's text-key record covers {recorded} tokens but the cache holds {past_length}; "
                        "edit caches only with the Cache methods (crop, reorder_cache, batch_select_indices, ...)"
                    )
            text_keys = record.update_text_keys(text_keys)
            kv_length = past_key_values.get_mask_sizes(query_length, 0)[0]
            if not is_torchdynamo_compiling() and past_length + query_length > kv_length:
                raise ValueError(f"the StaticCache holds {kv_length} tokens; {past_length + query_length} needed")

        # packed (padding-free) batches: only without a mask, regions, cached tokens or static slots
        packable = attention_mask is None and mask_regions is None and kv_length == query_length
        segment_ids = None
        explicit_positions = position_ids is not None
        if position_ids is None:
            max_length = config.max_position_embeddings + config.num_hires_positions
            if not is_torchdynamo_compiling() and past_length + query_length > max_length:
                raise ValueError(
                    f"sequence of {past_length + query_length} tokens is longer than the model allows "
                    f"({max_length} positions); packed sequences need their position_ids"
                )
            position_ids = torch.arange(query_length, device=device) + past_length
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        if position_ids.dim() != 2 or position_ids.shape[1] != query_length or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids {list(position_ids.shape)} must match the input [{batch}, {query_length}]")
        position_ids = position_ids.expand(batch, -1)
        if packable and kwargs.get("cu_seq_lens_q") is not None:
            segment_ids = segments_from_cu_seq_lens(kwargs["cu_seq_lens_q"], batch, query_length)
        elif packable and explicit_positions and query_length > 1:
            segment_ids = packed_segment_ids(position_ids)

        hidden_states = self.embed(input_ids, position_ids, inputs_embeds)
        bias = config.text_attention_bias if text_attention_bias is None else float(text_attention_bias)
        if not math.isfinite(bias):
            raise ValueError(f"text_attention_bias must be a finite number, got {bias}")
        layer_mask, mask_kwargs = self.build_attention_mask(
            batch, query_length, past_length, kv_length, attention_mask, mask_regions, bias, text_keys,
            hidden_states.dtype, device, segment_ids,
        )
        hidden_states, all_hidden, all_attentions = self.run_layers(
            hidden_states,
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
            attention_mask=layer_mask,
            past_key_values=past_key_values,
            **mask_kwargs,
            **kwargs,
        )
        return CogLMModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden,
            attentions=all_attentions,
        )


def region_next_token_loss(
    logits: torch.Tensor,
    shift_labels: torch.Tensor,
    scored: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 2: cross-entropy of ``logits[:, p]`` against ``shift_labels[:, p]`` (the token after ``p``) at positions
    where ``scored[:, p]``.

    Targets equal to -100 are ignored. Summed and divided by ``num_items_in_batch`` when given (correct gradient
    accumulation with the Trainer), else averaged over the scored tokens.
    """
    targets = shift_labels.to(logits.device).masked_fill(~scored, -100)
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    if num_items_in_batch is None:
        num_items_in_batch = (targets != -100).sum().clamp(min=1)
    return loss / num_items_in_batch


class CogLMWithTiedHead(CogLMPreTrainedModel):
    """The CogLM transformer (built with ``attention_class``) plus the output head tied to the word embedding; the
    base of every CogView2 stage."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    attention_class: type[nn.Module] = CogLMAttention

    def __init__(self, config: CogLMConfig):
        super().__init__(config)
        self.transformer = CogLMModel(config, attention_class=self.attention_class)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def image_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits over the image ids only, in fp32 (as the official code): ``[..., num_image_tokens]``."""
        weight = self.lm_head.weight[: self.config.num_image_tokens]
        return F.linear(hidden_states.float(), weight.float())


class CogLMForMaskedRegions(CogLMWithTiedHead, GenerationMixin):
    """CogLM with the tied output head: stage-1 generation, caption scoring and CogLM training (Eq. 1 / Eq. 2)."""

    _auto_class = "AutoModelForMaskedLM"
    _can_compile_fullgraph = True  # StaticCache decoding steps trace as one graph (generate's compiled path)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None = None,
        labels: torch.LongTensor | None = None,
        text_attention_bias: float | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        image_logits_only: bool = False,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CogLMOutput:
        r"""
        Args:
            mask_regions: per sample, inclusive ``(l, r)`` index pairs (Eq. 1); also define the loss positions.
            labels: ``[batch, seq]`` token ids to predict (usually ``input_ids``); inside each region ``l … r-1``
                predict ``labels[l+1 … r]``; without regions every position predicts the next one. -100 = ignore.
            shift_labels: ``[batch, seq]`` targets already aligned with the logits (position ``p`` predicts
                ``shift_labels[:, p]``), as sequence/context-parallel training passes them; they take precedence over
                ``labels``. With ``mask_regions`` only region positions ``l … r-1`` are scored.
            image_logits_only: return fp32 logits over the image ids only (generation); otherwise the full vocab.
            logits_to_keep: compute logits for the last N positions only (0 = all).
            Other arguments: see :meth:`CogLMModel.forward`.
        """
        outputs = self.transformer(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            mask_regions=mask_regions,
            text_attention_bias=text_attention_bias,
            past_key_values=past_key_values,
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        has_targets = labels is not None or shift_labels is not None
        if logits_to_keep:
            if has_targets:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.image_logits(hidden_states) if image_logits_only else self.lm_head(hidden_states)

        loss = None
        if has_targets:
            if image_logits_only:
                raise ValueError("labels need full-vocabulary logits; drop image_logits_only")
            batch, seq_len = hidden_states.shape[:2]
            for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
                if targets is not None and targets.shape != (batch, seq_len):
                    raise ValueError(f"{name} {list(targets.shape)} must match the input [{batch}, {seq_len}]")
            if past_key_values is not None and int(past_key_values.get_seq_length()) != seq_len:
                raise ValueError("compute the loss on a full sequence, not on cached decoding steps")
            if shift_labels is None:
                shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
            if mask_regions is None:
                scored = torch.ones(batch, seq_len, dtype=torch.bool, device=logits.device)
            else:
                scored = torch.stack(
                    [masked_regions_loss_mask(seq_len, r, device=logits.device) for r in mask_regions]
                )
            loss = region_next_token_loss(logits, shift_labels, scored, num_items_in_batch)

        return CogLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @staticmethod
    def broadcast_cache(cache: Cache, batch_size: int) -> Cache:
        """:func:`broadcast_prompt_cache` for callers that hold only the model (e.g. a pipeline loaded as remote
        code)."""
        return broadcast_prompt_cache(cache, batch_size)

    # ----------------------------------------------------------------------------------------------- generate
    def create_masks_for_generate(
        self,
        config: CogLMConfig,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
        **kwargs,
    ) -> torch.Tensor:
        """The 4D mask ``generate`` prepares for compilable (static) caches: bool ``[batch, 1, q, max_cache_len]``,
        causal over the cached tokens and the new ones, padded keys of a 2D ``attention_mask`` hidden. CogLM turns it
        into its attention implementation's format itself (with the text bias), so one format serves them all."""
        batch, query_length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        kv_length = (
            past_key_values.get_mask_sizes(query_length, 0)[0] if past_key_values is not None else query_length
        )
        query_index = torch.arange(query_length, device=device)[:, None]
        key_index = torch.arange(kv_length, device=device)[None, :]
        visible = (key_index <= query_index + past_length)[None].expand(batch, -1, -1)
        if attention_mask is not None:
            padding = attention_mask.to(device) != 0
            visible = visible & F.pad(padding, (0, kv_length - padding.shape[1]), value=False)[:, None, :]
        return visible[:, None]

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None = None,
        **kwargs,
    ) -> dict:
        """Transformers' preparation, plus two CogLM rules:

        * ``mask_regions`` (Eq. 1 over the prompt) apply to the first forward only; every generated token then
          attends causally to all earlier tokens, as a region token does.
        * with ``inputs_embeds``, the prompt's ``input_ids`` (when given too) travel along so that the text bias
          still knows which prompt keys are text.
        """
        regions_now = mask_regions if is_first_iteration else None
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            past_key_values=past_key_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        if regions_now is not None:
            # regions replace the causal 4D mask generate builds for static caches; padding stays a 2D mask
            model_inputs["attention_mask"] = attention_mask
            model_inputs["mask_regions"] = regions_now
        embeds = model_inputs.get("inputs_embeds")
        if embeds is not None and input_ids is not None and input_ids.shape[1] >= embeds.shape[1]:
            model_inputs["input_ids"] = input_ids[:, input_ids.shape[1] - embeds.shape[1] :]
        return model_inputs

    @torch.no_grad()
    def score_captions(
        self,
        image_tokens: torch.LongTensor,
        caption_ids: torch.LongTensor | Sequence[Sequence[int]],
        language_token_id: int | None = None,
    ) -> torch.FloatTensor:
        """Post-selection score: the mean log-likelihood of each caption given its image.

        Sequence ``[image (N), <start_of_chinese>, caption]``, image bidirectional, caption causal and seeing the
        image, positions image 513…, tag 0, caption 1…; no text bias; full-vocabulary log-softmax in fp32.

        Args:
            image_tokens: ``[batch, N]`` (or ``[batch, g, g]``) image ids.
            caption_ids: ``[batch, C]`` or one id list per sample (lists may differ in length; a single list or a
                ``[1, C]`` tensor is shared by the whole batch).
            language_token_id: tag before the caption; the official code always uses ``<start_of_chinese>``.

        Returns:
            ``[batch]`` fp32 scores (higher = better fit).
        """
        config = self.config
        image_tokens = image_tokens.reshape(image_tokens.shape[0], -1)
        batch, num_image = image_tokens.shape
        if num_image > config.num_image_positions:
            raise ValueError(f"{num_image} image tokens exceed the {config.num_image_positions} image positions")
        if isinstance(caption_ids, torch.Tensor):
            captions = [row.tolist() for row in caption_ids.reshape(-1, caption_ids.shape[-1])]
        else:
            single = len(caption_ids) > 0 and isinstance(caption_ids[0], int)
            captions = [list(caption_ids)] if single else [list(c) for c in caption_ids]
        if len(captions) == 1 and batch > 1:
            captions = captions * batch
        if len(captions) != batch:
            raise ValueError(f"need one caption per image ({batch} images), got {len(captions)} captions")
        if any(len(c) == 0 for c in captions):
            raise ValueError("a caption is empty; every caption needs at least one text id")
        tag = config.start_of_chinese_token_id if language_token_id is None else language_token_id
        caption_length = max(len(c) for c in captions)
        if caption_length + 1 > config.boi_position_id:
            raise ValueError(f"captions longer than {config.boi_position_id - 1} tokens do not fit the text positions")

        device = image_tokens.device
        padded = torch.full((batch, caption_length), config.pad_token_id or 0, dtype=torch.long, device=device)
        real = torch.zeros(batch, caption_length, dtype=torch.bool, device=device)
        for row, caption in enumerate(captions):
            padded[row, : len(caption)] = torch.tensor(caption, dtype=torch.long, device=device)
            real[row, : len(caption)] = True
        tags = torch.full((batch, 1), tag, dtype=torch.long, device=device)
        input_ids = torch.cat([image_tokens, tags, padded], dim=1)
        position_ids = caption_scoring_position_ids(num_image, caption_length, config.boi_position_id).to(device)
        regions = [caption_scoring_regions(num_image, caption_length)] * batch
        hidden = self.transformer(
            input_ids, position_ids=position_ids, mask_regions=regions, text_attention_bias=0.0, use_cache=False,
            return_dict=True,
        ).last_hidden_state
        # logits at index t-1 predict the caption token at t (t ≥ N+1); the tag itself is not scored
        logits = self.lm_head(hidden[:, num_image:-1]).float()
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, padded[..., None])[..., 0]
        log_probs = log_probs.masked_fill(~real, 0.0)
        return log_probs.sum(-1) / real.sum(-1)


__all__ = [
    "CogLMAttention",
    "CogLMForMaskedRegions",
    "CogLMLayer",
    "CogLMModel",
    "CogLMModelOutput",
    "CogLMOutput",
    "CogLMPreTrainedModel",
    "CogLMWithTiedHead",
    "CogLMDynamicCacheLayer",
    "CogLMStaticCacheLayer",
    "broadcast_prompt_cache",
    "format_attention_mask",
    "region_next_token_loss",
    "text_key_record_layer",
]
