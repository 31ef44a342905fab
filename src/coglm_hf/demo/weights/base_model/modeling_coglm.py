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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, is_torchdynamo_compiling

from .attention_masks import (
    batch_masked_regions_mask,
    caption_scoring_position_ids,
    caption_scoring_regions,
    masked_regions_loss_mask,
)
from .configuration_coglm import CogLMConfig

# Name of the attribute that carries, on a cache object, which cached keys are text (for the text-attention bias).
_TEXT_KEYS_ATTR = "coglm_text_keys"


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
    """Sandwich-LayerNorm layer (§1.2): ``x + LN3(Attn(LN_in x))``, then ``h + LN4(MLP(LN_post h))``.

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

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config and the model's source files, with ``auto_map`` entries for every Auto class so the
        folder loads with ``trust_remote_code=True`` where coglm_hf is not installed."""
        self.config.auto_map = dict(self._remote_auto_map)
        return super().save_pretrained(save_directory, *args, **kwargs)


def broadcast_prompt_cache(cache: Cache, batch_size: int) -> Cache:
    """Repeat a batch-1 prompt cache to ``batch_size`` rows in place (DynamicCache and StaticCache).

    Stage 1 encodes the prompt once and shares it across every image of the batch (§3.3).
    """
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.shape[0] == batch_size:
            continue
        if keys.shape[0] != 1:
            raise ValueError(f"cannot broadcast a cache of batch {keys.shape[0]} to batch {batch_size}; only 1 → N")
        layer.keys = layer.keys.expand(batch_size, *keys.shape[1:]).contiguous()
        layer.values = layer.values.expand(batch_size, *layer.values.shape[1:]).contiguous()
        if hasattr(layer, "batch_size"):
            layer.batch_size = batch_size
    text_keys = getattr(cache, _TEXT_KEYS_ATTR, None)
    if text_keys is not None and text_keys.shape[0] == 1:
        setattr(cache, _TEXT_KEYS_ATTR, text_keys.expand(batch_size, -1).contiguous())
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

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Word embedding + learned absolute position embedding (no scaling, no embedding norm): ``[batch, seq,
        hidden]``."""
        self.check_inputs(input_ids, position_ids)
        positions = self.position_embeddings(position_ids.clamp(max=self.config.max_position_embeddings - 1))
        if self.hires_position_embeddings is not None:
            hires_ids = position_ids - self.config.hires_position_offset
            hires = self.hires_position_embeddings(hires_ids.clamp(min=0, max=self.config.num_hires_positions - 1))
            positions = torch.where((hires_ids >= 0)[..., None], hires, positions)
        return self.embedding_dropout(self.word_embeddings(input_ids) + positions)

    # ----------------------------------------------------------------------------------------------- masks
    def build_attention_mask(
        self,
        input_ids: torch.Tensor,
        past_length: int,
        kv_length: int,
        attention_mask: torch.Tensor | None,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None,
        text_attention_bias: float,
        text_keys: torch.Tensor,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, dict]:
        """The attention mask (see :func:`format_attention_mask`) with ``c`` on visible text keys, plus extra
        attention kwargs.

        Visibility: an explicit 0/1 ``attention_mask`` (``[batch, q, k]`` or ``[batch, 1, q, k]``; batch may be 1),
        else Eq. 1 from ``mask_regions``, else causal; a 2D ``[batch, k]`` mask marks padded keys (HF convention).
        """
        batch, query_length = input_ids.shape
        total_length = past_length + query_length
        device = input_ids.device
        padding = None
        if attention_mask is not None and attention_mask.dim() == 2:
            padding, attention_mask = attention_mask.bool().to(device), None
            if padding.shape != (batch, total_length):
                raise ValueError(
                    f"a 2D attention_mask is a key padding mask and must be [batch, past + new tokens] = "
                    f"[{batch}, {total_length}], got {list(padding.shape)}; pass a [q, k] visibility mask as 3D"
                )

        if attention_mask is not None:
            if mask_regions is not None:
                raise ValueError("pass either mask_regions or a ready attention_mask, not both")
            visible = attention_mask.bool()
            if visible.dim() == 4:
                visible = visible[:, 0]
            if visible.dim() != 3 or visible.shape[-2:] != (query_length, total_length):
                raise ValueError(
                    f"attention_mask must be [batch, q, k] or [batch, 1, q, k] with q={query_length} new "
                    f"tokens and k={total_length} keys; got {list(attention_mask.shape)}"
                )
            visible = visible.expand(batch, -1, -1).to(device)
        elif mask_regions is not None:
            if len(mask_regions) != batch:
                raise ValueError(
                    f"mask_regions needs one list of (l, r) regions per sample: got {len(mask_regions)} lists for "
                    f"batch {batch}"
                )
            visible = batch_masked_regions_mask(total_length, mask_regions, device=device)[:, past_length:]
        else:
            visible = torch.ones(query_length, total_length, dtype=torch.bool, device=device).tril(past_length)
            visible = visible[None].expand(batch, -1, -1)
        if padding is not None:
            visible = visible & padding[:, None, :]

        if kv_length > total_length:  # static cache: slots past the filled length do not exist yet
            visible = F.pad(visible, (0, kv_length - total_length), value=False)
            text_keys = F.pad(text_keys, (0, kv_length - total_length), value=False)
        bias = text_keys[:, None, :].to(dtype) * text_attention_bias
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

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None = None,
        text_attention_bias: float | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> CogLMModelOutput:
        r"""
        Args:
            input_ids: ``[batch, q]`` token ids (image ids, text ids, specials).
            position_ids: ``[q]`` or ``[batch, q]``; defaults to ``past … past+q-1``. CogView2 layouts need their own
                (see :mod:`coglm_hf.attention_masks`).
            attention_mask: optional 0/1 visibility (``[batch, q, k]``, ``[batch, 1, q, k]``) or a ``[batch, k]``
                key padding mask.
            mask_regions: per sample, inclusive ``(l, r)`` regions of Eq. 1 (absolute indices in the full sequence,
                cached tokens included). Without it and without a mask the model is causal.
            text_attention_bias: ``c`` added to scores on text keys (ids in ``[text_token_offset, boi_token_id)``);
                defaults to ``config.text_attention_bias``; 0 turns it off.
            past_key_values: a ``DynamicCache``/``StaticCache``; a batch-1 prompt cache is broadcast to the batch.
        """
        config = self.config
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [batch, seq] LongTensor")
        batch, query_length = input_ids.shape
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)

        past_length = 0
        kv_length = query_length
        text_keys = config.is_text_token(input_ids)
        if past_key_values is not None:
            past_length = int(past_key_values.get_seq_length())
            if past_length:
                cached_batch = _cache_batch_size(past_key_values)
                if cached_batch == 1 and batch > 1:
                    broadcast_prompt_cache(past_key_values, batch)
                elif cached_batch not in (None, batch):
                    raise ValueError(f"the cache holds batch {cached_batch} but input_ids has batch {batch}")
                previous = getattr(past_key_values, _TEXT_KEYS_ATTR, None)
                if previous is None or previous.shape[1] != past_length:
                    raise ValueError("this cache was not filled by a CogLM forward pass (text-key record missing)")
                text_keys = torch.cat([previous.expand(batch, -1), text_keys], dim=1)
            setattr(past_key_values, _TEXT_KEYS_ATTR, text_keys)
            kv_length = past_length + query_length
            if isinstance(past_key_values, StaticCache):
                kv_length = past_key_values.get_mask_sizes(query_length, 0)[0]
                if past_length + query_length > kv_length:
                    raise ValueError(f"the StaticCache holds {kv_length} tokens; {past_length + query_length} needed")

        max_length = config.max_position_embeddings + config.num_hires_positions
        if past_length + query_length > max_length:
            raise ValueError(
                f"sequence of {past_length + query_length} tokens is longer than the model allows ({max_length} "
                "positions)"
            )
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + query_length, device=input_ids.device)
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(batch, -1)
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids {list(position_ids.shape)} must match input_ids {list(input_ids.shape)}")

        hidden_states = self.embed(input_ids, position_ids)
        bias = config.text_attention_bias if text_attention_bias is None else float(text_attention_bias)
        layer_mask, mask_kwargs = self.build_attention_mask(
            input_ids, past_length, kv_length, attention_mask, mask_regions, bias, text_keys, hidden_states.dtype
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
    labels: torch.Tensor,
    scored: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 2: cross-entropy of ``logits[:, p]`` against ``labels[:, p + 1]`` at positions where ``scored[:, p]``.

    Labels equal to -100 are ignored. Summed and divided by ``num_items_in_batch`` when given (correct gradient
    accumulation with the Trainer), else averaged over the scored tokens.
    """
    targets = labels[:, 1:].clone()
    targets[~scored[:, :-1]] = -100
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
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

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mask_regions: Sequence[Sequence[Sequence[int]]] | None = None,
        labels: torch.LongTensor | None = None,
        text_attention_bias: float | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        image_logits_only: bool = False,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CogLMOutput:
        r"""
        Args:
            mask_regions: per sample, inclusive ``(l, r)`` index pairs (Eq. 1); also define the loss positions.
            labels: ``[batch, seq]`` token ids to predict (usually ``input_ids``); inside each region ``l … r-1``
                predict ``labels[l+1 … r]``; without regions every position predicts the next one. -100 = ignore.
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
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            if labels is not None:
                raise ValueError("logits_to_keep cannot be combined with labels (the loss needs every position)")
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.image_logits(hidden_states) if image_logits_only else self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            if image_logits_only:
                raise ValueError("labels need full-vocabulary logits; drop image_logits_only")
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {list(labels.shape)} must match input_ids {list(input_ids.shape)}")
            if past_key_values is not None and int(past_key_values.get_seq_length()) != input_ids.shape[1]:
                raise ValueError("compute the loss on a full sequence, not on cached decoding steps")
            seq_len = input_ids.shape[1]
            regions = mask_regions if mask_regions is not None else [[(0, seq_len - 1)]] * input_ids.shape[0]
            scored = torch.stack([masked_regions_loss_mask(seq_len, r, device=input_ids.device) for r in regions])
            loss = region_next_token_loss(logits, labels, scored, num_items_in_batch)

        return CogLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @torch.no_grad()
    def score_captions(
        self,
        image_tokens: torch.LongTensor,
        caption_ids: torch.LongTensor | Sequence[Sequence[int]],
        language_token_id: int | None = None,
    ) -> torch.FloatTensor:
        """Post-selection score of §3.6: the mean log-likelihood of each caption given its image.

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
        if len(captions) != batch or any(len(c) == 0 for c in captions):
            raise ValueError(f"need one non-empty caption per image ({batch}); got {len(captions)} captions")
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
            input_ids, position_ids=position_ids, mask_regions=regions, text_attention_bias=0.0, use_cache=False
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
    "broadcast_prompt_cache",
    "format_attention_mask",
    "region_next_token_loss",
]
