"""CogLM text tokenizer: icetk's sentencepiece model on the `tokenizers` backend, with icetk's id layout.

icetk (the tokenizer of CogView2) puts the VQ image tokens first and shifts every sentencepiece id by the
number of image tokens:

    [0, text_token_offset)                                  image tokens (not text; reserved here)
    [text_token_offset, text_token_offset + num_text_tokens)  sentencepiece id + text_token_offset
    boi_token_id, start_of_english_token_id, start_of_chinese_token_id
                                                            `<start_of_image>`, `<start_of_english>`,
                                                            `<start_of_chinese>` (150000, 150001, 150002)

The backend ids *are* these ids, so `tokenizer(text).input_ids` feeds the model directly. The offset is baked
into the Unigram vocabulary: its first `text_token_offset` entries are placeholders (`<image 0>`, ...) whose
text contains a plain space, which the Metaspace pre-tokenizer has always replaced by `▁` before the model
runs, so the segmenter can never produce them.

icetk appends the three special tokens to the sentencepiece model as ordinary pieces with score 0, so the
segmenter matches their literal text as one piece wherever it occurs (score 0 beats every split). They are
Unigram pieces here too, flagged special but with `split_special_tokens=True`: the text goes through the
segmenter exactly as in icetk (e.g. `"<start_of_image> cat"` gives `▁`, `<start_of_image>`, `▁cat`), while
`decode(..., skip_special_tokens=True)` still drops them.
"""

from __future__ import annotations

import json
import os
import struct
import warnings

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import Unigram
from transformers import PreTrainedTokenizerFast

BOI_TOKEN = "<start_of_image>"
START_OF_ENGLISH_TOKEN = "<start_of_english>"
START_OF_CHINESE_TOKEN = "<start_of_chinese>"

# `--style` of the official text2image script -> prompt template.
STYLE_TEMPLATES: dict[str, str] = {
    "none": "{}<start_of_image>",
    "mainbody": "{} 高清摄影 隔绝<start_of_image>",
    "photo": "{} 高清摄影<start_of_image>",
    "flat": "{} 平面风格<start_of_image>",
    "comics": "{} 漫画 隔绝<start_of_image>",
    "oil": "{} 油画风格<start_of_image>",
    "sketch": "{} 素描风格<start_of_image>",
    "isometric": "{} 等距矢量图<start_of_image>",
    "chinese": "{} 水墨国画<start_of_image>",
    "watercolor": "{} 水彩画风格<start_of_image>",
}

# Vocabularies up to this many text pieces (the demo's) are listed in full when a prompt has unknown words.
LISTED_VOCABULARY_SIZE = 300


class UnknownWordsWarning(UserWarning):
    """A prompt has words the tokenizer has no pieces for: the model reads them as `<unk>`."""


COGVIEW2_TOKENS = (BOI_TOKEN, START_OF_ENGLISH_TOKEN, START_OF_CHINESE_TOKEN)

# sentencepiece ModelProto.SentencePiece.Type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


def _image_placeholder(index: int) -> str:
    return f"<image {index}>"


def _reserved_placeholder(index: int) -> str:
    return f"<reserved {index}>"


# ---------------------------------------------------------------------------------------------------------------
# sentencepiece model file (protobuf `ModelProto`), read without the protobuf package: icetk's own reader is
# the part of icetk that broke with protobuf >= 3.20, and only a handful of fields matter here.
# ---------------------------------------------------------------------------------------------------------------


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _read_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """Decode one protobuf message into `(field_number, value)` pairs (varints as int, the rest as bytes)."""
    fields, pos = [], 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            value, pos = _read_varint(data, pos)
        elif wire_type == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire_type == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        if pos > len(data):
            raise ValueError("truncated message")
        fields.append((number, value))
    return fields


def _expect(value: int | bytes, kind: type) -> int | bytes:
    if not isinstance(value, kind):
        raise ValueError("a field has an unexpected wire type")
    return value


# ModelProto.trainer_spec / normalizer_spec fields used here, with their proto defaults
_TRAINER_FIELDS = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback", 43: "pad_id"}
_NORMALIZER_FLAGS = {3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
_SPEC_DEFAULTS = {"model_type": 1, "treat_whitespace_as_suffix": False, "byte_fallback": False, "pad_id": -1,
                  "precompiled_charsmap": b"", "add_dummy_prefix": True, "remove_extra_whitespaces": True,
                  "escape_whitespaces": True}


def _read_piece(message: bytes) -> tuple[str, float, int]:
    piece, score, piece_type = None, 0.0, _NORMAL
    for number, value in _read_fields(message):
        if number == 1:
            piece = _expect(value, bytes).decode("utf-8")
        elif number == 2:
            (score,) = struct.unpack("<f", _expect(value, bytes))
        elif number == 3:
            piece_type = _expect(value, int)
    if piece is None:
        raise ValueError("a piece has no text")
    return piece, float(score), piece_type


def read_sentencepiece_model(path: str | os.PathLike) -> dict:
    """Read the parts of a sentencepiece `.model` file that the tokenizer needs.

    Returns a dict with `pieces` (list of `(piece, score, type)`), `model_type` (1 = unigram), `byte_fallback`,
    `pad_id`, and the normaliser settings `precompiled_charsmap`, `add_dummy_prefix`, `remove_extra_whitespaces`,
    `escape_whitespaces`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a sentencepiece model.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sentencepiece model not found: {path!r} (icetk's text model is `ice_text.model`)")
    with open(path, "rb") as handle:
        data = handle.read()
    not_a_model = f"{path!r} is not a sentencepiece model file (expected a serialized ModelProto, e.g. ice_text.model)"
    pieces, spec = [], dict(_SPEC_DEFAULTS)
    try:
        for number, value in _read_fields(data):
            if number == 1:
                pieces.append(_read_piece(_expect(value, bytes)))
            elif number == 2:
                for sub_number, sub_value in _read_fields(_expect(value, bytes)):
                    if sub_number in _TRAINER_FIELDS:
                        sub_value = _expect(sub_value, int)  # int32 fields: negative values use 64-bit varints
                        spec[_TRAINER_FIELDS[sub_number]] = sub_value - (1 << 64) if sub_value >= 1 << 63 else sub_value
            elif number == 3:
                for sub_number, sub_value in _read_fields(_expect(value, bytes)):
                    if sub_number == 2:
                        spec["precompiled_charsmap"] = _expect(sub_value, bytes)
                    elif sub_number in _NORMALIZER_FLAGS:
                        spec[_NORMALIZER_FLAGS[sub_number]] = bool(_expect(sub_value, int))
    except (ValueError, UnicodeDecodeError, struct.error) as error:
        raise ValueError(f"{not_a_model}: {error}") from None
    if not pieces:
        raise ValueError(f"{not_a_model}: it holds no pieces")
    if sum(piece_type == _UNKNOWN for _, _, piece_type in pieces) != 1:
        raise ValueError(f"{not_a_model}: it needs exactly one <unk> piece")
    spec["byte_fallback"] = bool(spec["byte_fallback"])
    spec["pieces"] = pieces
    return spec


def _build_backend(spm: dict, text_token_offset: int, special_ids: dict[str, int]) -> Tokenizer:
    """Assemble a `tokenizers.Tokenizer` equivalent to the sentencepiece model, with ids shifted by the offset."""
    if spm["model_type"] != 1:
        kind = {2: "BPE", 3: "word", 4: "char"}.get(spm["model_type"], str(spm["model_type"]))
        raise ValueError(f"only unigram sentencepiece models are supported (icetk's is one); this one is {kind}")
    if not spm["escape_whitespaces"] or spm["treat_whitespace_as_suffix"]:
        raise ValueError("sentencepiece models with escape_whitespaces=false or treat_whitespace_as_suffix=true are "
                         "not supported (icetk's uses the defaults)")
    vocab = [(_image_placeholder(i), 0.0) for i in range(text_token_offset)]
    vocab += [(piece, score) for piece, score, _ in spm["pieces"]]
    pieces = {piece: i for i, (piece, _, _) in enumerate(spm["pieces"])}
    for token, token_id in sorted(special_ids.items(), key=lambda item: item[1]):
        if token in pieces:
            continue  # already a piece (a model saved by icetk after adding its tokens); checked by the caller
        if token_id < len(vocab):
            raise ValueError(
                f"{token} id {token_id} collides with the text range [{text_token_offset}, "
                f"{text_token_offset + len(spm['pieces'])}) or another special id; choose an id >= {len(vocab)}"
            )
        vocab += [(_reserved_placeholder(i), 0.0) for i in range(len(vocab), token_id)]
        # score 0 beats any split, as for the pieces icetk appends to its sentencepiece model
        vocab.append((token, 0.0))

    unk_id = text_token_offset + next(i for i, (_, _, t) in enumerate(spm["pieces"]) if t == _UNKNOWN)
    backend = Tokenizer(Unigram(vocab, unk_id=unk_id, byte_fallback=spm["byte_fallback"]))

    # sentencepiece normalises with the precompiled rules, drops leading/trailing spaces, collapses runs of spaces
    # and prepends the "dummy prefix" space to non-empty text (`\A`/`\z`: `^`/`$` also match at line breaks here)
    steps = []
    if spm["precompiled_charsmap"]:
        try:
            steps.append(normalizers.Precompiled(spm["precompiled_charsmap"]))
        except Exception as error:  # the tokenizers library raises a bare Exception
            raise ValueError(f"the normalisation rules (precompiled_charsmap) are corrupt: {error}") from None
    if spm["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A | \z"), "")]
    if spm["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(" "))
    if steps:
        backend.normalizer = normalizers.Sequence(steps)
    # spaces become "▁"; sentencepiece segments the whole sentence at once: no split on whitespace
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    # decoding as sentencepiece: "▁" -> " ", bytes pieces -> UTF-8, drop the dummy-prefix space
    decoder_steps = [decoders.Replace("▁", " ")]
    if spm["byte_fallback"]:
        decoder_steps.append(decoders.ByteFallback())
    decoder_steps.append(decoders.Fuse())
    if spm["add_dummy_prefix"]:
        decoder_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decoder_steps)
    return backend


def _without_added_tokens(backend: Tokenizer, contents: tuple[str, ...]) -> Tokenizer:
    """``backend`` without the added-vocabulary entries named ``contents`` (their vocabulary pieces stay)."""
    if not any(token.content in contents for token in backend.get_added_tokens_decoder().values()):
        return backend
    state = json.loads(backend.to_str())
    state["added_tokens"] = [token for token in state["added_tokens"] if token["content"] not in contents]
    return Tokenizer.from_str(json.dumps(state))


class CogLMTokenizer(PreTrainedTokenizerFast):
    r"""Text tokenizer of CogLM/CogView2 with icetk's ids (a `tokenizers`-backend Transformers tokenizer).

    Build it once from icetk's `ice_text.model` with [`CogLMTokenizer.from_sentencepiece`], then
    `save_pretrained` / `from_pretrained` (a `tokenizer.json` and a `tokenizer_config.json`; no sentencepiece or
    protobuf needed at load time).

    Args:
        tokenizer_file: path of a `tokenizer.json` written by this class.
        tokenizer_object: a ready `tokenizers.Tokenizer` (used by `from_sentencepiece`).
        text_token_offset: id of sentencepiece piece 0 (= number of image tokens in icetk, 20000).
        num_text_tokens: number of sentencepiece pieces; text ids are
            `[text_token_offset, text_token_offset + num_text_tokens)`.
        boi_token_id, start_of_english_token_id, start_of_chinese_token_id: ids of `<start_of_image>`,
            `<start_of_english>`, `<start_of_chinese>`.
        unk_token, pad_token: the sentencepiece unknown and padding pieces (`<unk>` = 20000, `<pad>` = 20003 in
            icetk).
        chinese_piece_start: the first sentencepiece piece counted as Chinese when the pretraining collator picks a
            caption's language tag, for vocabularies laid out English first (the demo's: 31); `None` for icetk, whose
            value (63823) is the collator's default.

    Example:

    ```python
    >>> tokenizer = CogLMTokenizer.from_pretrained("converted/tokenizer")
    >>> tokenizer.encode_prompt("a cat", style="mainbody")[-1] == tokenizer.boi_token_id
    True
    ```
    """

    vocab_files_names = {"tokenizer_file": "tokenizer.json"}
    model_input_names = ["input_ids", "attention_mask"]
    style_templates = STYLE_TEMPLATES

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As ``PreTrainedTokenizerFast.from_pretrained``; a local path that does not exist is a
        ``FileNotFoundError`` (instead of the Hub client's repo-id error)."""
        path = pretrained_model_name_or_path
        if isinstance(path, (str, os.PathLike)) and not os.path.exists(os.path.expanduser(path)):
            text = os.fspath(path)
            if os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1:
                raise FileNotFoundError(f"folder not found: {text}; check the path (it is not a Hub repo id either)")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def __init__(
        self,
        tokenizer_file: str | None = None,
        tokenizer_object: Tokenizer | None = None,
        text_token_offset: int = 20000,
        num_text_tokens: int = 130000,
        boi_token_id: int = 150000,
        start_of_english_token_id: int = 150001,
        start_of_chinese_token_id: int = 150002,
        unk_token: str = "<unk>",
        pad_token: str | None = "<pad>",
        chinese_piece_start: int | None = None,
        **kwargs,
    ):
        if tokenizer_object is None and (tokenizer_file is None or not os.path.isfile(tokenizer_file)):
            raise ValueError(
                "CogLMTokenizer needs a tokenizer.json (load a saved tokenizer with `CogLMTokenizer.from_pretrained("
                "dir)`) or a sentencepiece model (`CogLMTokenizer.from_sentencepiece('ice_text.model')`)"
            )
        # The three CogView2 tokens are Unigram pieces segmented like icetk does, never matched ahead of the
        # segmenter as added tokens: keep them out of the added vocabulary (older saved files listed them there).
        backend = _without_added_tokens(
            tokenizer_object if tokenizer_object is not None else Tokenizer.from_file(tokenizer_file), COGVIEW2_TOKENS
        )
        added = kwargs.pop("added_tokens_decoder", None) or {}
        added = {index: token for index, token in added.items() if str(token) not in COGVIEW2_TOKENS}
        if added:
            kwargs["added_tokens_decoder"] = added
        extra = [token for token in kwargs.pop("extra_special_tokens", None) or [] if str(token) not in COGVIEW2_TOKENS]
        if extra:
            kwargs["extra_special_tokens"] = extra
        super().__init__(
            tokenizer_object=backend,
            text_token_offset=text_token_offset,
            num_text_tokens=num_text_tokens,
            boi_token_id=boi_token_id,
            start_of_english_token_id=start_of_english_token_id,
            start_of_chinese_token_id=start_of_chinese_token_id,
            unk_token=unk_token,
            pad_token=pad_token,
            chinese_piece_start=chinese_piece_start,
            **kwargs,
        )
        self.text_token_offset = int(text_token_offset)
        self.num_text_tokens = int(num_text_tokens)
        self.boi_token_id = int(boi_token_id)
        self.start_of_english_token_id = int(start_of_english_token_id)
        self.start_of_chinese_token_id = int(start_of_chinese_token_id)
        self.chinese_piece_start = None if chinese_piece_start is None else int(chinese_piece_start)
        self._check_id_layout()

    def _check_id_layout(self) -> None:
        text_end = self.text_token_offset + self.num_text_tokens
        expected = {BOI_TOKEN: self.boi_token_id, START_OF_ENGLISH_TOKEN: self.start_of_english_token_id,
                    START_OF_CHINESE_TOKEN: self.start_of_chinese_token_id}
        for token, token_id in expected.items():
            found = self._tokenizer.token_to_id(token)
            if found != token_id:
                raise ValueError(f"{token} has id {found} in the vocabulary but the config says {token_id}; "
                                 "rebuild the tokenizer with CogLMTokenizer.from_sentencepiece")
        first_added = max(expected.values()) + 1
        for name in ("unk_token", "pad_token"):
            token = getattr(self, name)
            token_id = self._tokenizer.token_to_id(token) if token is not None else None
            is_piece = token_id is not None and self.text_token_offset <= token_id < text_end
            # a pad token may also be a token added after the icetk layout (`add_special_tokens({"pad_token": ...})`)
            is_added = name == "pad_token" and token_id is not None and token_id >= first_added
            if token is not None and not (is_piece or is_added):
                raise ValueError(f"{name} {token!r} must be a sentencepiece piece (id in [{self.text_token_offset}, "
                                 f"{text_end})){' or an added token' if name == 'pad_token' else ''}, got id "
                                 f"{token_id}")

    @classmethod
    def convert_to_native_format(cls, trust_remote_code: bool = False, **kwargs):
        # `tokenizer.json` already holds the exact pipeline; never rebuild it from extracted vocab/merges.
        return kwargs

    @classmethod
    def from_sentencepiece(
        cls,
        model_file: str | os.PathLike,
        text_token_offset: int = 20000,
        boi_token_id: int | None = None,
        start_of_english_token_id: int | None = None,
        start_of_chinese_token_id: int | None = None,
        **kwargs,
    ) -> CogLMTokenizer:
        """Build the tokenizer from a sentencepiece unigram model (icetk's `ice_text.model`).

        Args:
            model_file: the sentencepiece `.model` file.
            text_token_offset: added to every sentencepiece id (20000 = icetk's image-token count; use the
                codebook size of a small VQ model for small setups).
            boi_token_id: id of `<start_of_image>`; default right after the text range
                (`text_token_offset + number of pieces`, i.e. 150000 for icetk's 130000-piece model). If the
                model already holds the piece (icetk saves it there), its shifted id is used and must match.
            start_of_english_token_id, start_of_chinese_token_id: default `boi_token_id + 1`, `+ 2`.
            kwargs: passed to the constructor (e.g. `model_max_length`).

        Raises:
            FileNotFoundError, ValueError: missing file, not a sentencepiece model, not unigram, or colliding ids.
        """
        if isinstance(text_token_offset, bool) or not isinstance(text_token_offset, int) or text_token_offset < 0:
            raise ValueError(f"text_token_offset must be an int >= 0, got {text_token_offset!r}")
        spm = read_sentencepiece_model(model_file)
        pieces = {piece: i for i, (piece, _, _) in enumerate(spm["pieces"])}
        # icetk appends its special tokens at the end of the model: the text pieces are those before them
        num_text_tokens = min([pieces[t] for t in (BOI_TOKEN, START_OF_ENGLISH_TOKEN, START_OF_CHINESE_TOKEN)
                               if t in pieces] + [len(pieces)])
        if any(piece not in (BOI_TOKEN, START_OF_ENGLISH_TOKEN, START_OF_CHINESE_TOKEN)
               for piece, _, _ in spm["pieces"][num_text_tokens:]):
            raise ValueError(f"{str(model_file)!r} holds CogView2's special tokens among its text pieces; they must "
                             "be its last pieces (as icetk appends them)")
        text_end = text_token_offset + len(spm["pieces"])
        requested = {BOI_TOKEN: boi_token_id, START_OF_ENGLISH_TOKEN: start_of_english_token_id,
                     START_OF_CHINESE_TOKEN: start_of_chinese_token_id}
        special_ids: dict[str, int] = {}
        next_free = text_end
        for token, token_id in requested.items():
            if token in pieces:
                shifted = pieces[token] + text_token_offset
                if token_id is not None and token_id != shifted:
                    raise ValueError(f"{token} is piece {pieces[token]} of {model_file!r}, i.e. id {shifted}, "
                                     f"but {token_id} was requested; drop the argument or fix it")
                token_id = shifted
            elif token_id is None:
                token_id = special_ids[BOI_TOKEN] + len(special_ids) if special_ids else next_free
            special_ids[token] = int(token_id)
        if len(set(special_ids.values())) != 3:
            raise ValueError(f"special token ids must be distinct, got {special_ids}")

        # <pad>: the piece the model declares as padding (icetk: piece 3 -> 20003), else a piece named "<pad>"
        pad_id = spm["pad_id"]
        pad_token = spm["pieces"][pad_id][0] if 0 <= pad_id < len(spm["pieces"]) else None
        if pad_token is None and "<pad>" in pieces:
            pad_token = "<pad>"
        unk_token = next(piece for piece, _, t in spm["pieces"] if t == _UNKNOWN)
        try:
            backend = _build_backend(spm, text_token_offset, special_ids)
        except ValueError as error:
            raise ValueError(f"cannot convert {str(model_file)!r}: {error}") from None
        return cls(
            tokenizer_object=backend,
            text_token_offset=text_token_offset,
            num_text_tokens=num_text_tokens,
            boi_token_id=special_ids[BOI_TOKEN],
            start_of_english_token_id=special_ids[START_OF_ENGLISH_TOKEN],
            start_of_chinese_token_id=special_ids[START_OF_CHINESE_TOKEN],
            unk_token=kwargs.pop("unk_token", unk_token),
            pad_token=kwargs.pop("pad_token", pad_token),
            **kwargs,
        )

    def is_text_token(self, token_id: int) -> bool:
        """True for ids of sentencepiece pieces (`text_token_offset <= id < text_token_offset + num_text_tokens`)."""
        return self.text_token_offset <= token_id < self.text_token_offset + self.num_text_tokens

    def unknown_words(self, text: str) -> list[str]:
        """The parts of `text` the vocabulary has no piece for (they become `<unk>`), in order, without repeats."""
        encoding = self.backend_tokenizer.encode(text, add_special_tokens=False)
        spans = [text[start:end].strip() for token_id, (start, end) in zip(encoding.ids, encoding.offsets)
                 if token_id == self.unk_token_id]
        return list(dict.fromkeys(span for span in spans if span))

    def known_words(self) -> list[str]:
        """Every text piece of the vocabulary as a word (without the leading "▁"), sorted."""
        specials = {self.unk_token, self.pad_token}
        words = {piece.removeprefix("▁") for piece, token_id in self.get_vocab().items()
                 if self.is_text_token(token_id) and piece not in specials and not piece.startswith("<")}
        return sorted(word for word in words if any(char.isalnum() for char in word))

    def _warn_unknown_words(self, text: str) -> None:
        unknown = self.unknown_words(text)
        if not unknown:
            return
        if self.num_text_tokens <= LISTED_VOCABULARY_SIZE:
            known = f"it knows only these words: {', '.join(self.known_words())}"
        else:
            known = f"its vocabulary has {self.num_text_tokens} pieces"
        warnings.warn(f"the prompt {text!r} has words this model's tokenizer does not know, read as <unk>: "
                      f"{', '.join(unknown)}; {known}", UnknownWordsWarning, stacklevel=3)

    def encode_prompt(self, text: str, style: str = "mainbody") -> list[int]:
        """Token ids of a text-to-image prompt in CogView2's template for `style`.

        The result ends with `boi_token_id` (`<start_of_image>`, one token). No language tag is inserted, as in the
        official script.

        Args:
            text: the user prompt (English or Chinese).
            style: a key of `STYLE_TEMPLATES` (`"mainbody"` is the official default; `"none"` adds no suffix).

        Warns:
            UnknownWordsWarning: `text` has words without a piece in the vocabulary (they would be read as `<unk>`);
                the message names them and, for a small vocabulary (the demo's), every word the model knows.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if style not in self.style_templates:
            raise ValueError(f"unknown style {style!r}; choose one of {sorted(self.style_templates)}")
        self._warn_unknown_words(text)
        ids = self.encode(self.style_templates[style].format(text), add_special_tokens=False)
        if ids[-1] != self.boi_token_id:
            raise ValueError(f"the prompt template for {style!r} did not end with {BOI_TOKEN}: {ids[-4:]}")
        return ids

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        # Image ids and reserved slots are not text: drop them instead of printing placeholder names. The three
        # CogView2 tokens are vocabulary pieces, not added tokens, so `skip_special_tokens` drops them here.
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        specials = {self.boi_token_id, self.start_of_english_token_id, self.start_of_chinese_token_id}
        added = self.added_tokens_decoder
        token_ids = [
            int(i) for i in token_ids
            if self.is_text_token(int(i)) or int(i) in added or (int(i) in specials and not skip_special_tokens)
        ]
        return super()._decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)


__all__ = ["CogLMTokenizer", "STYLE_TEMPLATES", "UnknownWordsWarning", "read_sentencepiece_model"]
