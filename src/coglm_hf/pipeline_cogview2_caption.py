"""CogView2CaptionPipeline: image → caption with the CogLM base model (the captioning task of its pretraining).

CogLM masks text to caption images (the "image → text" rows of its pretraining). This pipeline
turns that into generation:

```
image ──image_tokenizer──► stage-1 grid (20×20 ids) ──► [image (N), language tag] ──base_model.generate──► caption
```

Layout and mask are the pretraining caption row's: image tokens at positions `boi_position_id + 1 …` attend to each
other bidirectionally (they are context), the language tag (`<start_of_english>` / `<start_of_chinese>`) at
position 0 and the caption at `1, 2, …` form one causal region that sees the whole image (Eq. 1). The image is
encoded once into the cache (bidirectional), then `base_model.generate` decodes the tag and the caption causally,
so greedy, sampling and beam search are Transformers' own. Text up-weighting is off (`c = 0`), as in training.

Captions end at the end-of-caption token when the model emits it (the sentencepiece `<eos>` / `</s>` piece; models
finetuned with `CogLMPretrainingCollator(caption_end_token_id=...)` learn it), else after `max_new_tokens`.

Ships as remote code next to `pipeline_cogview2.py`: imports only torch, transformers, diffusers and its siblings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache

from .image_processing_icevq import IceVQImageProcessor
from .pipeline_cogview2 import CogView2StagesMixin

LANGUAGES = ("en", "zh")
# pieces that end a caption, in the order they are looked up in the tokenizer (demo / icetk sentencepiece models)
END_OF_CAPTION_PIECES = ("<eos>", "</s>")


@dataclass
class CogView2CaptionPipelineOutput(BaseOutput):
    """Output of `CogView2CaptionPipeline`.

    Args:
        captions: per image, `num_captions_per_image` strings (best first when ranked).
        caption_ids: the same captions as text id lists (no tag, no end token).
        scores: `[images, num_captions_per_image]` float32 caption scores (mean log-likelihood of the caption given
            the image, the post-selection score) when `rank_by_score=True`, else `None`.
    """

    captions: list[list[str]]
    caption_ids: list[list[list[int]]]
    scores: torch.Tensor | None = None


class TextOnlyLogitsProcessor(LogitsProcessor):
    """Keep only text ids `[text_token_offset, boi_token_id)` (and the end token): a caption never holds image ids
    or CogView2's special tokens."""

    def __init__(self, text_token_offset: int, boi_token_id: int, end_token_id: int | None):
        self.text_token_offset, self.boi_token_id, self.end_token_id = text_token_offset, boi_token_id, end_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
        allowed[self.text_token_offset : self.boi_token_id] = True
        if self.end_token_id is not None:
            allowed[self.end_token_id] = True
        return scores.masked_fill(~allowed, float("-inf"))


class CogView2CaptionPipeline(CogView2StagesMixin, DiffusionPipeline):
    r"""Image captioning with the CogLM base model of CogView2.

    Components: `tokenizer` (`CogLMTokenizer`), `image_tokenizer` (`IceVQModel`) and `base_model`
    (`CogLMForMaskedRegions`); the super-resolution models and the scheduler are not used (`from_pretrained` leaves
    the SR models out). Build it from a text-to-image pipeline without copying weights with
    `CogView2CaptionPipeline.from_pipe(pipe)`.

    Example:

    ```py
    >>> from coglm_hf.pipeline_cogview2_caption import CogView2CaptionPipeline

    >>> captioner = CogView2CaptionPipeline.from_pretrained("converted/cogview2")
    >>> captioner(image, language="en", num_beams=4).captions[0][0]
    ```
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a CogView2 pipeline folder without its super-resolution models (see
        `CogView2Pipeline.from_pretrained` for the arguments)."""
        kwargs.setdefault("dsr_model", None)
        kwargs.setdefault("itersr_model", None)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def image_size(self) -> int:
        """Side in pixels of the image the stage-1 grid encodes (160 for CogView2: 20 tokens × rate 8)."""
        return self.low_res_grid * self.image_tokenizer.config.compress_rate

    def end_token_id(self) -> int | None:
        """The end-of-caption id: the tokenizer's `<eos>` (or `</s>`) piece, `None` if it has neither."""
        if self.tokenizer is None:
            return None
        unknown = self.tokenizer.unk_token_id
        for piece in END_OF_CAPTION_PIECES:
            token_id = self.tokenizer.convert_tokens_to_ids(piece)
            if isinstance(token_id, int) and token_id != unknown:
                return token_id
        return None

    def check_caption_inputs(self, image: Any, image_tokens: Any, language: str) -> None:
        missing = [name for name in ("base_model", "tokenizer") if getattr(self, name, None) is None]
        if image is not None and self.image_tokenizer is None:
            missing.append("image_tokenizer (or pass image_tokens)")
        if missing:
            raise ValueError(f"{type(self).__name__} is missing components: {', '.join(missing)}. Load them with "
                             "from_pretrained or pass them to the constructor.")
        if (image is None) == (image_tokens is None):
            raise ValueError("pass exactly one of image (PIL images, arrays or tensors) and image_tokens "
                             "(stage-1 grids of VQ ids)")
        if language not in LANGUAGES:
            raise ValueError(f"language must be one of {LANGUAGES}, got {language!r}")

    @torch.no_grad()
    def encode_images(self, image: Any) -> torch.LongTensor:
        """Images → `[B, N]` stage-1 VQ ids: each image is resized (shorter side) and centre-cropped to
        `image_size`, as icetk does."""
        if isinstance(image, (list, tuple)) and not image:
            raise ValueError("no images given")
        pixels = IceVQImageProcessor(image_size=self.image_size).preprocess(image)
        vq = self.image_tokenizer
        tokens = vq.encode(pixels.to(self._execution_device, vq.dtype)).long()
        return tokens.reshape(tokens.shape[0], -1)

    def _check_image_tokens(self, image_tokens: Any) -> torch.LongTensor:
        config = self.base_model.config
        tokens = torch.as_tensor(image_tokens)
        if tokens.is_floating_point() or tokens.dim() not in (2, 3):
            raise ValueError(f"image_tokens must be integer grids [B, {config.image_grid_size}, "
                             f"{config.image_grid_size}] or [B, {config.num_image_positions}], got "
                             f"{tokens.dtype} {list(tokens.shape)}")
        tokens = tokens.reshape(tokens.shape[0], -1).long().to(self._execution_device)
        if tokens.shape[1] != config.image_grid_size**2:
            raise ValueError(f"image_tokens must hold {config.image_grid_size}×{config.image_grid_size} ids per "
                             f"image, got {tokens.shape[1]}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= config.num_image_tokens:
            raise ValueError(f"image_tokens must be VQ ids in [0, {config.num_image_tokens})")
        return tokens

    def prefill(self, image_tokens: torch.LongTensor) -> DynamicCache:
        """Encode `[B, N]` image tokens once into a cache: bidirectional among themselves (Eq. 1 context), positions
        `boi_position_id + 1 …`, no text bias."""
        config = self.base_model.config
        num_image = image_tokens.shape[1]
        positions = config.boi_position_id + 1 + torch.arange(num_image, device=image_tokens.device)
        cache = DynamicCache(config=config)
        self.base_model.transformer(image_tokens, position_ids=positions, mask_regions=[[]] * image_tokens.shape[0],
                                    text_attention_bias=0.0, past_key_values=cache, use_cache=True)
        return cache

    @staticmethod
    def _seed_from(generator: torch.Generator | None) -> int | None:
        if generator is None:
            return None
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))

    @torch.no_grad()
    def __call__(
        self,
        image: Any = None,
        image_tokens: Any = None,
        language: str = "en",
        num_captions_per_image: int = 1,
        do_sample: bool = False,
        num_beams: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        max_new_tokens: int | None = None,
        rank_by_score: bool = False,
        generator: torch.Generator | None = None,
        batch_size: int = 8,
        return_dict: bool = True,
        **generate_kwargs,
    ) -> CogView2CaptionPipelineOutput | tuple:
        r"""Caption images.

        Args:
            image: one image or a list (PIL, `[H, W, 3]` arrays, `[3, H, W]` tensors in [0, 1]); resized and
                centre-cropped to `image_size`.
            image_tokens: instead of `image`: stage-1 grids `[B, g, g]` or `[B, g²]` of VQ ids.
            language: "en" (`<start_of_english>`) or "zh" (`<start_of_chinese>`): the tag the caption follows.
            num_captions_per_image: captions returned per image (beam search returns its best beams, sampling draws
                independent samples; greedy decoding needs 1).
            do_sample, num_beams, temperature, top_k, top_p: Transformers' decoding modes (default greedy).
            max_new_tokens: longest caption (default: the model's text length, at most `boi_position_id - 1`).
            rank_by_score: score each caption (mean log-likelihood given the image, as post-selection does) and
                order each image's captions best first.
            generator: source of randomness of sampling (seeds the draw; the global RNG is left untouched).
            batch_size: images captioned together.
            generate_kwargs: further `GenerationConfig` fields (e.g. `repetition_penalty`, `length_penalty`).

        Returns:
            `CogView2CaptionPipelineOutput` (or `(captions, scores)` when `return_dict=False`).
        """
        self.check_caption_inputs(image, image_tokens, language)
        for name, value in (("num_captions_per_image", num_captions_per_image), ("num_beams", num_beams),
                            ("batch_size", batch_size)):
            self._check_batch_size(name, value)
        if num_beams > 1 and num_captions_per_image > num_beams:
            raise ValueError(f"beam search returns at most num_beams={num_beams} captions per image; asked for "
                             f"{num_captions_per_image}")
        if num_beams == 1 and not do_sample and num_captions_per_image > 1:
            raise ValueError("greedy decoding gives one caption per image; use do_sample=True or num_beams > 1 for "
                             "several")
        config = self.base_model.config
        limit = min(config.max_text_length, config.boi_position_id - 1)
        max_new_tokens = limit if max_new_tokens is None else max_new_tokens
        if not 0 < max_new_tokens <= limit:
            raise ValueError(f"max_new_tokens must be in [1, {limit}] (the model's text positions), got "
                             f"{max_new_tokens}")
        self._check_generator(generator, self._execution_device)
        tokens = self.encode_images(image) if image is not None else self._check_image_tokens(image_tokens)

        tag = config.start_of_english_token_id if language == "en" else config.start_of_chinese_token_id
        end = self.end_token_id()
        expand = num_beams if num_beams > 1 else num_captions_per_image
        settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": num_beams,
                    "num_return_sequences": num_captions_per_image, "eos_token_id": end,
                    "pad_token_id": end if end is not None else config.boi_token_id, **generate_kwargs}
        if do_sample:
            settings.update(temperature=temperature, top_k=top_k, top_p=top_p)
        processors = LogitsProcessorList([TextOnlyLogitsProcessor(config.text_token_offset, config.boi_token_id, end)])
        num_image = tokens.shape[1]
        positions = torch.cat([config.boi_position_id + 1 + torch.arange(num_image), torch.zeros(1, dtype=torch.long)])
        captions: list[list[int]] = []
        with self.progress_bar(total=tokens.shape[0]) as progress:
            progress.set_description("captions")
            for chunk in tokens.split(batch_size):
                batch = chunk.shape[0]
                cache = self.prefill(chunk.repeat_interleave(expand, dim=0))
                prompt = torch.cat([chunk, chunk.new_full((batch, 1), tag)], dim=1)
                seed = self._seed_from(generator)
                with torch.random.fork_rng(devices=[self._execution_device] if self._execution_device.type == "cuda"
                                           else []):
                    if seed is not None:
                        torch.manual_seed(seed)
                    output = self.base_model.generate(
                        prompt,
                        attention_mask=torch.ones_like(prompt),
                        position_ids=positions.to(prompt.device)[None].expand(batch, -1),
                        past_key_values=cache,
                        text_attention_bias=0.0,
                        logits_processor=processors,
                        use_cache=True,
                        **settings,
                    )
                for row in output[:, num_image + 1 :].tolist():
                    captions.append(_until(row, end, config.text_token_offset, config.boi_token_id))
                progress.update(batch)

        per_image = [captions[i : i + num_captions_per_image] for i in range(0, len(captions), num_captions_per_image)]
        scores = None
        if rank_by_score:
            scores, per_image = self.rank(tokens, per_image, tag, batch_size)
        texts = [[self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in group] for group in per_image]
        self.maybe_free_model_hooks()
        if not return_dict:
            return texts, scores
        return CogView2CaptionPipelineOutput(captions=texts, caption_ids=per_image, scores=scores)

    def rank(self, image_tokens: torch.LongTensor, captions: Sequence[Sequence[Sequence[int]]], tag: int,
             batch_size: int) -> tuple[torch.Tensor, list[list[list[int]]]]:
        """Score every caption with `base_model.score_captions` (the post-selection score) and sort each image's
        captions best first. Empty captions score `-inf`."""
        rows = [(i, ids) for i, group in enumerate(captions) for ids in group]
        scores = torch.full((len(rows),), float("-inf"))
        scored = [k for k, (_, ids) in enumerate(rows) if ids]
        for start in range(0, len(scored), batch_size):
            part = scored[start : start + batch_size]
            images = image_tokens[[rows[k][0] for k in part]]
            values = self.base_model.score_captions(images, [rows[k][1] for k in part], language_token_id=tag)
            scores[part] = values.float().cpu()
        scores = scores.view(len(captions), -1)
        order = torch.argsort(scores, dim=1, descending=True, stable=True)
        ranked = [[list(captions[i][j]) for j in order[i].tolist()] for i in range(len(captions))]
        return scores.gather(1, order), ranked


def _until(ids: list[int], end: int | None, text_start: int, text_end: int) -> list[int]:
    """The caption's text ids: everything before the first end token (padding after it included)."""
    if end is not None and end in ids:
        ids = ids[: ids.index(end)]
    return [i for i in ids if text_start <= i < text_end]


__all__ = ["CogView2CaptionPipeline", "CogView2CaptionPipelineOutput", "TextOnlyLogitsProcessor"]
