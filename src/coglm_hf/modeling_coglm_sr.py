"""The two super-resolution stages of CogView2 on the CogLM backbone.

* :class:`CogLMForDirectSuperResolution` (official ``cogview2-dsr``): one forward pass turns the 20×20 stage-1
  tokens into logits for all 60×60 cells. The sequence is ``[text slots | low-res grid | hi-res grid]``; the first
  two parts ("level 0") attend to each other with the base attention weights, every hi-res query attends, under one
  softmax, to its 9×5 hi-res window and to the 5×5 low-res window around its parent cell, with a second set of
  attention weights (``hires_query_key_value``/``hires_dense``, the official ``attention_plus`` mixin).
* :class:`CogLMForIterativeSuperResolution` (official ``cogview2-itersr``, LoPAR): the sequence is
  ``[text slots | 60×60 grid]`` with ``<start_of_image>`` at the cells to regenerate; every image query attends to
  all text slots (global keys, padding masked) and its 9×5 window; text queries attend to the text slots only.

Both take plain inputs (text ids with a padding mask and an image grid) and build the official padded layout
themselves; grids, windows and text slots come from the config. LayerNorms and MLPs are the shared backbone
(:class:`CogLMModel`); only the attention module differs. This file ships as remote code: it imports only torch,
transformers and sibling files.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_coglm import CogLMDirectSRConfig, CogLMIterativeSRConfig
from .local_attention import local_attention_2d
from .modeling_coglm import CogLMAttention, CogLMWithTiedHead, format_attention_mask

IGNORE_INDEX = -100


@dataclass
class CogLMSuperResolutionOutput(ModelOutput):
    """Output of the super-resolution models.

    Args:
        loss: cross-entropy over the scored cells (direct SR: every hi-res cell; iterative SR: the masked cells),
            summed and divided by ``num_items_in_batch`` when given, else averaged.
        logits: ``[batch, G·G, num_image_tokens]`` fp32 logits of every hi-res cell (raster order).
        hidden_states: per-layer inputs and the final output over the whole internal layout ``[batch, N, hidden]``
            when ``output_hidden_states``.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SuperResolutionLayout(ModelOutput):
    """The official padded sequence of one SR stage, built by ``prepare_layout``.

    Args:
        input_ids: ``[batch, N]`` layout ids: left-padded text slots, then the image part(s).
        position_ids: ``[batch, N]``: pads 0, text ``0 … t-1``, low-res ``boi_position_id + 1 …`` (direct SR),
            hi-res ``hires_position_offset + j``.
        text_mask: ``[batch, text_slots]`` bool, True on real text slots (False on pads).
    """

    input_ids: torch.LongTensor | None = None
    position_ids: torch.LongTensor | None = None
    text_mask: torch.BoolTensor | None = None


# ----------------------------------------------------------------------------------------------------- layouts
def _check_ids(name: str, tensor: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {tensor.dtype}")


def pack_text_slots(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_slots: int, pad_token_id: int, stage: str
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Right-align the real text tokens of each row into ``num_slots`` slots, pads on the left (official layout).

    Args:
        input_ids: ``[batch, T]`` text ids; padding may sit on either side (or anywhere).
        attention_mask: ``[batch, T]`` 1 on real tokens, 0 on padding; ``None`` = all real.
        num_slots: text slots of the stage (96 for direct SR, 16 for iterative SR).
        pad_token_id: id written into the pad slots.
        stage: name used in error messages.

    Returns:
        ``(slot_ids [batch, num_slots], text_mask [batch, num_slots])``; the real tokens keep their order.
    """
    _check_ids("input_ids", input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, text_length], got shape {list(input_ids.shape)}")
    if attention_mask is None:
        real = torch.ones_like(input_ids, dtype=torch.bool)
    else:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}"
            )
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 0 (padding) and 1 (real text) only")
        real = attention_mask.to(device=input_ids.device) != 0
    lengths = real.sum(-1)
    longest = int(lengths.max()) if lengths.numel() else 0
    if longest > num_slots:
        raise ValueError(
            f"{stage}: a prompt has {longest} text tokens but the model has {num_slots} text slots "
            f"(config.sr_text_slots); shorten it, e.g. input_ids[:, :{num_slots}] (what the official iterative-SR "
            "stage does)."
        )
    batch = input_ids.shape[0]
    # rank of each real token counted from the end of its row → its slot from the right
    from_end = real.flip(-1).cumsum(-1).flip(-1)
    slot = num_slots - from_end
    slot_ids = torch.full((batch, num_slots + 1), pad_token_id, dtype=torch.long, device=input_ids.device)
    target = torch.where(real, slot, torch.full_like(slot, num_slots))  # padding lands in a dropped extra column
    slot_ids.scatter_(1, target, input_ids.long())
    text_mask = torch.arange(num_slots, device=input_ids.device)[None] >= (num_slots - lengths)[:, None]
    return slot_ids[:, :num_slots], text_mask


def text_slot_position_ids(text_mask: torch.Tensor) -> torch.LongTensor:
    """Positions of left-padded text slots: pads 0, text ``0 … t-1`` (``[batch, slots]``)."""
    return (text_mask.long().cumsum(-1) - 1).clamp(min=0)


def flatten_grid(tokens: torch.Tensor, grid: int, name: str, batch: int | None = None) -> torch.LongTensor:
    """``[batch, grid, grid]`` or ``[batch, grid²]`` → ``[batch, grid²]`` (raster order); clear errors otherwise."""
    _check_ids(name, tokens)
    cells = grid * grid
    if tokens.dim() == 3 and tokens.shape[1:] == (grid, grid):
        tokens = tokens.reshape(tokens.shape[0], cells)
    if tokens.dim() != 2 or tokens.shape[1] != cells:
        raise ValueError(f"{name} must be [batch, {grid}, {grid}] or [batch, {cells}], got {list(tokens.shape)}")
    if batch is not None and tokens.shape[0] != batch:
        raise ValueError(f"{name} has batch {tokens.shape[0]} but input_ids has batch {batch}")
    return tokens.long()


def _check_image_ids(name: str, tokens: torch.Tensor, num_image_tokens: int, mask_token_id: int | None = None):
    allowed = (tokens >= 0) & (tokens < num_image_tokens)
    if mask_token_id is not None:
        allowed |= tokens == mask_token_id
    if not bool(allowed.all()):
        bad = tokens[~allowed][:4].tolist()
        extra = f" or the mask token {mask_token_id}" if mask_token_id is not None else ""
        raise ValueError(f"{name} must hold image ids in [0, {num_image_tokens}){extra}; found {bad}")


def direct_sr_level0_visibility(text_mask: torch.Tensor, num_image: int) -> torch.BoolTensor:
    """Level-0 visibility of direct SR, ``[batch, S + n, S + n]`` bool (True = may attend).

    Text slots see only text slots; real rows (real text and the ``n`` low-res tokens) never see pad slots; pad rows
    see every text slot. Everything else is bidirectional.
    """
    batch, slots = text_mask.shape
    device = text_mask.device
    is_text = torch.arange(slots + num_image, device=device) < slots
    real_key = torch.cat([text_mask, torch.ones(batch, num_image, dtype=torch.bool, device=device)], dim=1)
    pad_row = ~real_key
    return (~is_text[None, :, None] | is_text[None, None, :]) & (real_key[:, None, :] | pad_row[:, :, None])


# --------------------------------------------------------------------------------------------------- attention
def _split_heads(fused: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Fused ``[batch, seq, 3·hidden]`` projection → q, k, v ``[batch, heads, seq, head_dim]``."""
    batch, seq, _ = fused.shape
    return fused.view(batch, seq, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(states: torch.Tensor) -> torch.Tensor:
    """``[batch, heads, seq, head_dim]`` → ``[batch, seq, hidden]``."""
    batch, heads, seq, head_dim = states.shape
    return states.transpose(1, 2).reshape(batch, seq, heads * head_dim)


class CogLMDirectSRAttention(CogLMAttention):
    """Two-level attention of direct SR.

    Level 0 (text slots + low-res grid): ordinary attention with the base ``query_key_value``/``dense`` under the
    level-0 mask, through Transformers' attention interface. Level 1 (hi-res grid): ``hires_query_key_value``/
    ``hires_dense``; each query one softmax over its ``local_window`` of hi-res keys and the ``cross_window`` of the
    same layer's level-0 low-res keys around its parent cell (:func:`local_attention_2d` with cross keys).
    ``config.attention_dropout`` applies to level 0 only (the local op has no dropout; inference uses none).
    """

    def __init__(self, config: CogLMDirectSRConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.hires_query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.hires_dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.num_text_slots = config.sr_text_slots
        self.num_level0 = config.sr_text_slots + config.num_image_positions
        self.low_grid = (config.image_grid_size, config.image_grid_size)
        self.high_grid = (config.hires_grid_size, config.hires_grid_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states`` ``[batch, S + g² + G², hidden]``; ``attention_mask`` the additive level-0 mask
        ``[batch, 1, S + g², S + g²]``. Returns ``([batch, N, hidden], None)``."""
        low, high = hidden_states[:, : self.num_level0], hidden_states[:, self.num_level0 :]
        query, key, value = self.project_qkv(low)
        low_output = self.dense(self.attend(query, key, value, attention_mask, **kwargs)[0])

        hires_query, hires_key, hires_value = _split_heads(
            self.hires_query_key_value(high), self.num_heads, self.head_dim
        )
        high_output = local_attention_2d(
            hires_query,
            hires_key,
            hires_value,
            grid=self.high_grid,
            window=self.config.local_window,
            cross_key=key[:, :, self.num_text_slots :],
            cross_value=value[:, :, self.num_text_slots :],
            cross_grid=self.low_grid,
            cross_window=self.config.cross_window,
            scale=self.scaling,
        )
        high_output = self.hires_dense(_merge_heads(high_output))
        return torch.cat([low_output, high_output], dim=1), None


class CogLMIterativeSRAttention(CogLMAttention):
    """Attention of iterative SR, one ``query_key_value``/``dense`` for all positions.

    Text queries attend to the text slots (pads masked) through Transformers' attention interface; each image query
    one softmax over all text slots (global keys, pads masked) and its ``local_window`` of image keys
    (:func:`local_attention_2d` with global keys).
    """

    def __init__(self, config: CogLMIterativeSRConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_text_slots = config.sr_text_slots
        self.grid = (config.hires_grid_size, config.hires_grid_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        """``hidden_states`` ``[batch, S + G², hidden]``; ``attention_mask`` the additive text-stream mask
        ``[batch, 1, S, S]``; ``text_mask`` ``[batch, S]`` bool (True = real text slot)."""
        slots = self.num_text_slots
        query, key, value = self.project_qkv(hidden_states)
        text_output, _ = self.attend(
            query[:, :, :slots], key[:, :, :slots], value[:, :, :slots], attention_mask, **kwargs
        )
        image_output = local_attention_2d(
            query[:, :, slots:],
            key[:, :, slots:],
            value[:, :, slots:],
            grid=self.grid,
            window=self.config.local_window,
            global_key=key[:, :, :slots],
            global_value=value[:, :, :slots],
            global_key_mask=text_mask,
            scale=self.scaling,
        )
        output = torch.cat([text_output, _merge_heads(image_output)], dim=1)
        return self.dense(output), None


# ------------------------------------------------------------------------------------------------------ models
class CogLMSuperResolutionPreTrainedModel(CogLMWithTiedHead):
    """Shared head of the two SR models: the tied output head restricted to image ids, the loss, the layout run."""

    _auto_class = "AutoModel"
    # forward sums the loss and divides by ``num_items_in_batch`` when the Trainer passes it (gradient accumulation)
    accepts_loss_kwargs = True

    def attention_kwargs(self, layout: SuperResolutionLayout, dtype: torch.dtype) -> dict:
        """Keyword arguments of the attention modules for ``layout`` (masks); defined by each SR model."""
        raise NotImplementedError(f"{type(self).__name__} must define attention_kwargs")

    def forward_layout(
        self, layout: SuperResolutionLayout, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple | None]:
        """Run the backbone on a prepared layout. Returns the final hidden states over the whole layout
        ``[batch, N, hidden]`` (after the final LayerNorm) and, with ``output_hidden_states``, every layer's input."""
        hidden_states = self.transformer.embed(layout.input_ids, layout.position_ids)
        hidden_states, all_hidden, _ = self.transformer.run_layers(
            hidden_states,
            output_hidden_states=output_hidden_states,
            **self.attention_kwargs(layout, hidden_states.dtype),
        )
        return hidden_states, all_hidden

    def check_labels(self, labels: torch.Tensor, batch: int) -> torch.LongTensor:
        """``[batch, G, G]`` or ``[batch, G²]`` hi-res targets (image ids or -100) → ``[batch, G²]``."""
        labels = flatten_grid(labels, self.config.hires_grid_size, "labels", batch=batch)
        _check_image_ids("labels (outside -100)", labels[labels != IGNORE_INDEX], self.config.num_image_tokens)
        return labels

    @staticmethod
    def token_loss(
        logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy of ``logits`` ``[..., V]`` against ``targets`` ``[...]`` (-100 ignored), summed and divided by
        ``num_items_in_batch`` when given (the Trainer's gradient-accumulation convention), else averaged."""
        targets = targets.to(logits.device)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        if num_items_in_batch is None:
            num_items_in_batch = (targets != IGNORE_INDEX).sum().clamp(min=1)
        return loss / num_items_in_batch


class CogLMForDirectSuperResolution(CogLMSuperResolutionPreTrainedModel):
    """Direct super-resolution: ``image_grid_size``² low-res tokens → logits for all ``hires_grid_size``² cells
    in one pass (official ``cogview2-dsr``).

    Example::

        out = model(input_ids=text_ids, attention_mask=text_mask, low_res_tokens=stage1_tokens)  # [B, 20, 20]
        tokens = out.logits.argmax(-1).view(-1, 60, 60)
    """

    config: CogLMDirectSRConfig
    config_class = CogLMDirectSRConfig
    attention_class = CogLMDirectSRAttention
    _remote_auto_map: dict[str, str] = {
        "AutoConfig": "configuration_coglm.CogLMDirectSRConfig",
        "AutoModel": "modeling_coglm_sr.CogLMForDirectSuperResolution",
    }

    def prepare_layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        low_res_tokens: torch.Tensor,
    ) -> SuperResolutionLayout:
        """Build the official sequence ``[pads, text | low-res | <start_of_image> × G²]``.

        Positions: pads 0, text ``0 … t-1``, low-res ``boi_position_id + 1 …``, hi-res ``hires_position_offset + j``.
        """
        config = self.config
        slot_ids, text_mask = pack_text_slots(
            input_ids, attention_mask, config.sr_text_slots, config.pad_token_id or 0, "direct super-resolution"
        )
        batch, device = slot_ids.shape[0], slot_ids.device
        low_res = flatten_grid(low_res_tokens, config.image_grid_size, "low_res_tokens", batch=batch).to(device)
        _check_image_ids("low_res_tokens", low_res, config.num_image_tokens)
        hires = torch.full((batch, config.num_hires_positions), config.boi_token_id, dtype=torch.long, device=device)
        low_positions = config.boi_position_id + 1 + torch.arange(config.num_image_positions, device=device)
        hires_positions = config.hires_position_offset + torch.arange(config.num_hires_positions, device=device)
        position_ids = torch.cat(
            [
                text_slot_position_ids(text_mask),
                low_positions[None].expand(batch, -1),
                hires_positions[None].expand(batch, -1),
            ],
            dim=1,
        )
        return SuperResolutionLayout(
            input_ids=torch.cat([slot_ids, low_res, hires], dim=1), position_ids=position_ids, text_mask=text_mask
        )

    def attention_kwargs(self, layout: SuperResolutionLayout, dtype: torch.dtype) -> dict:
        visible = direct_sr_level0_visibility(layout.text_mask, self.config.num_image_positions)
        mask, extra = format_attention_mask(visible, None, self.config, dtype)
        return {"attention_mask": mask, **extra}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        low_res_tokens: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> CogLMSuperResolutionOutput:
        r"""
        Args:
            input_ids: ``[batch, T]`` prompt ids (without ``<start_of_image>``), ``T ≤ sr_text_slots`` real tokens.
            attention_mask: ``[batch, T]``, 1 = real text, 0 = padding (either side); ``None`` = no padding.
            low_res_tokens: ``[batch, g, g]`` or ``[batch, g²]`` stage-1 image ids (raster order).
            labels: optional ``[batch, G, G]`` or ``[batch, G²]`` hi-res image ids (-100 = ignore) → ``loss``.
            output_hidden_states: also return every layer's hidden states over the internal layout.
            num_items_in_batch: loss normaliser (Trainer gradient accumulation); default: the number of labels.

        Returns:
            :class:`CogLMSuperResolutionOutput` with ``logits`` ``[batch, G², num_image_tokens]`` (fp32); the cell
            ``(r, c)`` is row ``G·r + c``.
        """
        if low_res_tokens is None:
            raise ValueError("direct super-resolution needs low_res_tokens ([batch, g, g] stage-1 image ids)")
        layout = self.prepare_layout(input_ids, attention_mask, low_res_tokens)
        hidden_states, all_hidden = self.forward_layout(layout, output_hidden_states=bool(output_hidden_states))
        # only the hi-res rows produce logits (the official code also scores the 496 level-0 rows)
        num_level0 = self.config.sr_text_slots + self.config.num_image_positions
        logits = self.image_logits(hidden_states[:, num_level0:])
        loss = None
        if labels is not None:
            loss = self.token_loss(logits, self.check_labels(labels, logits.shape[0]), num_items_in_batch)
        return CogLMSuperResolutionOutput(loss=loss, logits=logits, hidden_states=all_hidden)


class CogLMForIterativeSuperResolution(CogLMSuperResolutionPreTrainedModel):
    """Iterative super-resolution, one LoPAR pass: regenerate the cells that hold the mask token
    (``<start_of_image>``, ``config.boi_token_id``) given the others, the text and the 9×5 neighbourhood
    (official ``cogview2-itersr``). The pass schedule lives in :mod:`coglm_hf.sampling`.

    Example::

        masked = torch.where(regenerate, model.config.boi_token_id, tokens)                   # [B, 60, 60]
        logits = model(input_ids=text_ids[:, :16], attention_mask=mask[:, :16], image_tokens=masked).logits
        tokens = torch.where(regenerate, logits.argmax(-1).view_as(tokens), tokens)
    """

    config: CogLMIterativeSRConfig
    config_class = CogLMIterativeSRConfig
    attention_class = CogLMIterativeSRAttention
    _remote_auto_map: dict[str, str] = {
        "AutoConfig": "configuration_coglm.CogLMIterativeSRConfig",
        "AutoModel": "modeling_coglm_sr.CogLMForIterativeSuperResolution",
    }

    @property
    def mask_token_id(self) -> int:
        """The id marking cells to regenerate: ``<start_of_image>`` (CogView2 has no [MASK] token)."""
        return self.config.boi_token_id

    def prepare_layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_tokens: torch.Tensor,
    ) -> SuperResolutionLayout:
        """Build the official sequence ``[pads, text | G² image cells]``; positions pads 0, text
        ``0 … t-1``, image ``hires_position_offset + j``."""
        config = self.config
        slot_ids, text_mask = pack_text_slots(
            input_ids, attention_mask, config.sr_text_slots, config.pad_token_id or 0, "iterative super-resolution"
        )
        batch, device = slot_ids.shape[0], slot_ids.device
        image = flatten_grid(image_tokens, config.hires_grid_size, "image_tokens", batch=batch).to(device)
        _check_image_ids("image_tokens", image, config.num_image_tokens, mask_token_id=self.mask_token_id)
        image_positions = config.hires_position_offset + torch.arange(config.num_hires_positions, device=device)
        position_ids = torch.cat([text_slot_position_ids(text_mask), image_positions[None].expand(batch, -1)], dim=1)
        return SuperResolutionLayout(
            input_ids=torch.cat([slot_ids, image], dim=1), position_ids=position_ids, text_mask=text_mask
        )

    def attention_kwargs(self, layout: SuperResolutionLayout, dtype: torch.dtype) -> dict:
        text_mask = layout.text_mask
        # An empty prompt leaves the text queries nothing to see: let them read the pad slots rather than risk a
        # NaN (-inf everywhere) in half precision. Image queries never see those rows, so no logit changes.
        readable = text_mask | ~text_mask.any(-1, keepdim=True)
        visible = readable[:, None, :].expand(-1, text_mask.shape[1], -1)
        mask, extra = format_attention_mask(visible, None, self.config, dtype)
        return {"attention_mask": mask, "text_mask": text_mask, **extra}

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        image_tokens: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        masked_logits_only: bool = False,
        output_hidden_states: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> CogLMSuperResolutionOutput:
        r"""
        Args:
            input_ids: ``[batch, T]`` prompt ids, at most ``sr_text_slots`` (16) real tokens — the official pipeline
                passes the first 16 ids of the prompt.
            attention_mask: ``[batch, T]``, 1 = real text, 0 = padding (either side); ``None`` = no padding.
            image_tokens: ``[batch, G, G]`` or ``[batch, G²]`` current image ids with the mask token
                (``config.boi_token_id``) at the cells to regenerate.
            labels: optional ``[batch, G, G]`` or ``[batch, G²]`` target ids; the loss covers the masked cells only.
            masked_logits_only: compute logits only for the cells holding the mask token (all a LoPAR pass samples):
                ``[num_masked, num_image_tokens]`` in (batch, cell) raster order, i.e. ``logits[masked]`` of the full
                output, at a fraction of the head's cost and memory.
            output_hidden_states: also return every layer's hidden states over the internal layout.
            num_items_in_batch: loss normaliser (Trainer gradient accumulation); default: the number of scored cells.

        Returns:
            :class:`CogLMSuperResolutionOutput` with ``logits`` ``[batch, G², num_image_tokens]`` (fp32), or
            ``[num_masked, num_image_tokens]`` with ``masked_logits_only``.
        """
        if image_tokens is None:
            raise ValueError("iterative super-resolution needs image_tokens ([batch, G, G] with the mask token)")
        layout = self.prepare_layout(input_ids, attention_mask, image_tokens)
        hidden_states, all_hidden = self.forward_layout(layout, output_hidden_states=bool(output_hidden_states))
        image_states = hidden_states[:, self.config.sr_text_slots :]
        masked = layout.input_ids[:, self.config.sr_text_slots :] == self.mask_token_id
        logits = self.image_logits(image_states[masked] if masked_logits_only else image_states)
        loss = None
        if labels is not None:
            targets = self.check_labels(labels, masked.shape[0]).to(masked.device)
            targets = targets[masked] if masked_logits_only else targets.masked_fill(~masked, IGNORE_INDEX)
            loss = self.token_loss(logits, targets, num_items_in_batch)
        return CogLMSuperResolutionOutput(loss=loss, logits=logits, hidden_states=all_hidden)


__all__ = [
    "CogLMDirectSRAttention",
    "CogLMForDirectSuperResolution",
    "CogLMForIterativeSuperResolution",
    "CogLMIterativeSRAttention",
    "CogLMSuperResolutionOutput",
    "CogLMSuperResolutionPreTrainedModel",
    "SuperResolutionLayout",
    "direct_sr_level0_visibility",
    "pack_text_slots",
    "text_slot_position_ids",
]
