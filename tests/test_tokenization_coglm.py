"""CogLMTokenizer against sentencepiece itself, on a small English+Chinese model trained in the test."""

from __future__ import annotations

import io
import random
import struct

import pytest
import sentencepiece as spm
from transformers import TokenizersBackend

from coglm_hf.tokenization_coglm import STYLE_TEMPLATES, CogLMTokenizer, read_sentencepiece_model

OFFSET = 512  # a small codebook: text ids start right after 512 image ids
SPECIALS = ("<start_of_image>", "<start_of_english>", "<start_of_chinese>")

ENGLISH = ("the a photo of cat dog house tree river mountain city street car red blue green small big old new "
           "beautiful sunset over under with and in on at painting portrait landscape drawing style light dark "
           "night morning girl boy flower bird sky water").split()
CHINESE = "一只猫狗在河边的山上城市街道红色蓝色绿色小大老新美丽日落夜晚早晨画像风景绘画高清摄影隔绝平面风格漫画油画素描等距矢量图水墨国画水彩女孩花鸟天空"


def _corpus(rng: random.Random, lines: int = 3000) -> list[str]:
    corpus = []
    for _ in range(lines):
        kind = rng.random()
        if kind < 0.4:
            words = " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(3, 12)))
            corpus.append(words.capitalize() + rng.choice([".", "!", "?", ",", ""]))
        elif kind < 0.8:
            corpus.append("".join(rng.choice(CHINESE) for _ in range(rng.randint(3, 20))) + rng.choice(["。", "，", ""]))
        else:
            corpus.append(" ".join(rng.choice(ENGLISH) for _ in range(3)) + " " +
                          "".join(rng.choice(CHINESE) for _ in range(5)) + f" {rng.randint(0, 999)}")
    return corpus


def _train(model_type: str = "unigram", vocab_size: int = 400, **options) -> bytes:
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(random.Random(0))), model_writer=buffer, vocab_size=vocab_size,
        model_type=model_type, pad_id=3, minloglevel=2, **{"character_coverage": 1.0, **options},
    )
    return buffer.getvalue()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _append_pieces(model: bytes, pieces: tuple[str, ...]) -> bytes:
    """What icetk's `add_special_tokens` does: append NORMAL pieces with score 0 to the ModelProto."""
    for piece in pieces:
        text = piece.encode()
        message = b"\x0a" + _varint(len(text)) + text + b"\x15" + struct.pack("<f", 0.0)
        model += b"\x0a" + _varint(len(message)) + message  # repeated field 1: appended pieces come last
    return model


@pytest.fixture(scope="module")
def spm_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    plain = _train()
    (folder / "text.model").write_bytes(plain)
    (folder / "icetk.model").write_bytes(_append_pieces(plain, SPECIALS))
    return folder


@pytest.fixture(scope="module")
def sp(spm_files):
    return spm.SentencePieceProcessor(model_file=str(spm_files / "text.model"))


@pytest.fixture(scope="module")
def sp_icetk(spm_files):
    """sentencepiece with the three tokens appended as icetk does at import time."""
    return spm.SentencePieceProcessor(model_file=str(spm_files / "icetk.model"))


@pytest.fixture(scope="module")
def tokenizer(spm_files):
    return CogLMTokenizer.from_sentencepiece(spm_files / "text.model", text_token_offset=OFFSET)


def _varied_strings(count_per_kind: int = 120) -> list[str]:
    rng = random.Random(1234)
    pools = {
        "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "digits": "0123456789",
        "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "cjk": CHINESE,
        "rare_cjk": "龘齉爩鬱彧饕餮",
        "cjk_punct": "，。！？、；：“”（）【】《》",
        "emoji": "😀🐱🚀👍🏽\u200d❤\ufe0f🇨🇳",
        "latin": "éàüñçøÅß",
        "fullwidth": "ＡＢＣ１２３\u3000！",
        "spaces": "  \t\n\r",
        "compat": "ﬁ㎏①Ⅻ\u00a0\u200b\ufeff",
    }

    def chunk(pool: str) -> str:
        return "".join(rng.choice(pool) for _ in range(rng.randint(1, 6)))

    strings = {"": "empty"}
    makers = {
        "ascii": lambda: " ".join(rng.choice(ENGLISH) for _ in range(rng.randint(1, 8))),
        "cjk": lambda: "".join(rng.choice(CHINESE) for _ in range(rng.randint(1, 15))),
        "mixed": lambda: rng.choice(["", " "]).join(rng.choice([rng.choice(ENGLISH), chunk(CHINESE), chunk(
            pools["digits"])]) for _ in range(rng.randint(2, 6))),
        "repeated_spaces": lambda: (" " * rng.randint(0, 4)).join(
            [" " * rng.randint(0, 3) + rng.choice(ENGLISH) for _ in range(rng.randint(1, 5))]) + " " * rng.randint(0, 3),
        "punctuation": lambda: rng.choice(ENGLISH) + chunk(pools["punct"]) + chunk(pools["cjk_punct"]),
        "emoji": lambda: rng.choice(ENGLISH) + chunk(pools["emoji"]) + " " + chunk(CHINESE),
        "whitespace_only": lambda: chunk(pools["spaces"]),
        "random_pools": lambda: rng.choice(["", " ", "  "]).join(
            chunk(rng.choice(list(pools.values()))) for _ in range(rng.randint(1, 8))),
    }
    for kind, make in makers.items():
        for _ in range(count_per_kind * (3 if kind == "random_pools" else 1)):
            strings.setdefault(make(), kind)
    return list(strings)


def test_ids_are_sentencepiece_ids_plus_offset(tokenizer, sp):
    strings = _varied_strings()
    assert len(strings) >= 1000
    assert "" in strings and any("  " in s for s in strings) and any("😀" in s or "🐱" in s for s in strings)
    mismatches = []
    for text in strings:
        ours = tokenizer.encode(text, add_special_tokens=False)
        expected = [i + OFFSET for i in sp.encode(text)]
        if ours != expected:
            mismatches.append((text, ours, expected))
    assert not mismatches, f"{len(mismatches)}/{len(strings)} differ, e.g. {mismatches[:3]}"
    # batched calls give the same ids
    assert tokenizer(strings[:50])["input_ids"] == [[i + OFFSET for i in sp.encode(s)] for s in strings[:50]]


@pytest.mark.parametrize(
    "options", [{"byte_fallback": True, "character_coverage": 0.99}, {"normalization_rule_name": "identity"},
                {"add_dummy_prefix": False}], ids=["byte_fallback", "identity_normalization", "no_dummy_prefix"])
def test_other_sentencepiece_settings(tmp_path, options):
    (tmp_path / "variant.model").write_bytes(_train(**options))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "variant.model"))
    tokenizer = CogLMTokenizer.from_sentencepiece(tmp_path / "variant.model", text_token_offset=OFFSET)
    strings = _varied_strings(40)
    assert [tokenizer.encode(s) for s in strings] == [[i + OFFSET for i in sp.encode(s)] for s in strings]
    known = [s for s in strings if sp.unk_id() not in sp.encode(s)]
    assert len(known) > 50
    assert [tokenizer.decode(tokenizer.encode(s)) for s in known] == [sp.decode(sp.encode(s)) for s in known]


def test_id_layout(tokenizer, sp):
    num_pieces = sp.get_piece_size()
    assert tokenizer.text_token_offset == OFFSET and tokenizer.num_text_tokens == num_pieces
    # specials right after the text range, as in icetk (130000 pieces + 20000 -> 150000)
    assert (tokenizer.boi_token_id, tokenizer.start_of_english_token_id, tokenizer.start_of_chinese_token_id) == (
        OFFSET + num_pieces, OFFSET + num_pieces + 1, OFFSET + num_pieces + 2)
    assert tokenizer.convert_tokens_to_ids(list(SPECIALS)) == [OFFSET + num_pieces + i for i in range(3)]
    assert tokenizer.unk_token_id == OFFSET + sp.unk_id()
    assert tokenizer.pad_token_id == OFFSET + sp.pad_id() == OFFSET + 3  # <pad> = 20003 in icetk
    assert len(tokenizer) == OFFSET + num_pieces + 3
    assert tokenizer.convert_ids_to_tokens(OFFSET + 10) == sp.id_to_piece(10)
    # image ids are never produced
    assert min(min(tokenizer.encode(s)) for s in ["a cat", "一只猫", "x😀y"]) >= OFFSET


def test_custom_special_ids_with_gaps(spm_files, sp):
    tokenizer = CogLMTokenizer.from_sentencepiece(
        spm_files / "text.model", text_token_offset=1000, boi_token_id=1500, start_of_english_token_id=1502,
        start_of_chinese_token_id=1501)
    assert tokenizer.convert_tokens_to_ids(list(SPECIALS)) == [1500, 1502, 1501]
    assert tokenizer.encode("a photo") == [i + 1000 for i in sp.encode("a photo")]
    assert tokenizer.encode_prompt("a photo", style="none") == [i + 1000 for i in sp.encode("a photo")] + [1500]


def test_special_ids_survive_save_and_load(tokenizer, tmp_path, sp):
    tokenizer.save_pretrained(tmp_path)
    loaded = CogLMTokenizer.from_pretrained(tmp_path)
    assert type(loaded) is CogLMTokenizer
    for name in ("text_token_offset", "num_text_tokens", "boi_token_id", "start_of_english_token_id",
                 "start_of_chinese_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(loaded, name) == getattr(tokenizer, name), name
    assert loaded.convert_tokens_to_ids(list(SPECIALS)) == tokenizer.convert_tokens_to_ids(list(SPECIALS))
    text = "a photo of 一只猫 在河边"
    assert loaded.encode(text) == tokenizer.encode(text) == [i + OFFSET for i in sp.encode(text)]
    assert loaded.encode_prompt("cat", "oil") == tokenizer.encode_prompt("cat", "oil")
    # tokenizer.json alone is self-describing: the generic backend class reads the same ids
    generic = TokenizersBackend.from_pretrained(tmp_path)
    assert generic.encode(STYLE_TEMPLATES["mainbody"].format(text)) == tokenizer.encode_prompt(text)


@pytest.mark.parametrize("style", sorted(STYLE_TEMPLATES))
@pytest.mark.parametrize("prompt", ["a beautiful girl", "一只猫在河边", "cat  and  dog ", ""])
def test_templates_tokenize_like_icetk(tokenizer, sp_icetk, style, prompt):
    ids = tokenizer.encode_prompt(prompt, style=style)
    # icetk: the template text through sentencepiece with the three appended pieces, + offset
    assert ids == [i + OFFSET for i in sp_icetk.encode(STYLE_TEMPLATES[style].format(prompt))]
    assert ids[-1] == tokenizer.boi_token_id and ids.count(tokenizer.boi_token_id) == 1
    assert all(tokenizer.is_text_token(i) for i in ids[:-1])


def test_templates_match_reference_table():
    assert STYLE_TEMPLATES["mainbody"] == "{} 高清摄影 隔绝<start_of_image>"
    assert STYLE_TEMPLATES["none"] == "{}<start_of_image>"
    assert len(STYLE_TEMPLATES) == 10 and all(t.endswith("<start_of_image>") for t in STYLE_TEMPLATES.values())


@pytest.mark.parametrize(
    "text", ["<start_of_image> cat", "a <start_of_image> b<start_of_chinese>c", "dog  <start_of_english>",
             "<start_of_chinese>一只猫<start_of_image>"])
def test_special_tokens_inside_text_segment_like_icetk(tokenizer, sp_icetk, text):
    assert tokenizer.encode(text) == [i + OFFSET for i in sp_icetk.encode(text)]


def test_model_that_already_holds_the_special_pieces(spm_files, sp_icetk, tokenizer):
    from_icetk_file = CogLMTokenizer.from_sentencepiece(spm_files / "icetk.model", text_token_offset=OFFSET)
    assert from_icetk_file.boi_token_id == tokenizer.boi_token_id == OFFSET + sp_icetk.piece_to_id(SPECIALS[0])
    assert from_icetk_file.num_text_tokens == tokenizer.num_text_tokens
    assert from_icetk_file.encode_prompt("a cat") == tokenizer.encode_prompt("a cat")
    with pytest.raises(ValueError, match="was requested"):
        CogLMTokenizer.from_sentencepiece(spm_files / "icetk.model", text_token_offset=OFFSET, boi_token_id=5000)


def test_decode(tokenizer, sp):
    known = [s for s in _varied_strings(40) if sp.unk_id() not in sp.encode(s)]
    assert len(known) > 100
    assert [tokenizer.decode(tokenizer.encode(s)) for s in known] == [sp.decode(sp.encode(s)) for s in known]
    ids = tokenizer.encode_prompt("a cat", style="photo")
    assert tokenizer.decode(ids) == "a cat 高清摄影<start_of_image>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a cat 高清摄影"
    # image ids are not text: dropped
    assert tokenizer.decode([0, 5, OFFSET - 1] + ids[:2]) == tokenizer.decode(ids[:2])
    assert tokenizer.batch_decode([ids[:2], ids[2:4]]) == [tokenizer.decode(ids[:2]), tokenizer.decode(ids[2:4])]


def test_padding_uses_icetk_pad(tokenizer):
    batch = tokenizer(["a cat", "a photo of a red car"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id and batch["attention_mask"][0][-1] == 0


def test_not_a_sentencepiece_file(tmp_path):
    for name, data in {"text.model": b"hello world, not a model\n", "empty.model": b"",
                       "random.model": bytes(random.Random(0).randrange(256) for _ in range(4096))}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a sentencepiece model"):
            CogLMTokenizer.from_sentencepiece(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="ice_text.model"):
        CogLMTokenizer.from_sentencepiece(tmp_path / "missing.model")


def test_bpe_model_is_rejected(tmp_path):
    (tmp_path / "bpe.model").write_bytes(_train("bpe", 300))
    assert read_sentencepiece_model(tmp_path / "bpe.model")["model_type"] == 2
    with pytest.raises(ValueError, match="only unigram"):
        CogLMTokenizer.from_sentencepiece(tmp_path / "bpe.model")


def test_bad_arguments(spm_files, tokenizer, sp):
    with pytest.raises(ValueError, match="collides with the text range"):
        CogLMTokenizer.from_sentencepiece(spm_files / "text.model", text_token_offset=OFFSET, boi_token_id=OFFSET + 5)
    with pytest.raises(ValueError, match="distinct"):
        CogLMTokenizer.from_sentencepiece(spm_files / "text.model", text_token_offset=OFFSET, boi_token_id=2000,
                                          start_of_english_token_id=2000)
    with pytest.raises(ValueError, match="unknown style"):
        tokenizer.encode_prompt("a cat", style="cubism")
    with pytest.raises(TypeError, match="str"):
        tokenizer.encode_prompt(["a cat"])
    with pytest.raises(ValueError, match="from_sentencepiece"):
        CogLMTokenizer()


def test_config_must_match_vocabulary(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="<start_of_image> has id"):
        CogLMTokenizer.from_pretrained(tmp_path, boi_token_id=150000)


def test_added_special_tokens_round_trip_unsplit_without_moving_icetk_ids(spm_files, tmp_path, sp):
    tokenizer = CogLMTokenizer.from_sentencepiece(spm_files / "text.model", text_token_offset=OFFSET,
                                                  model_max_length=77)
    layout = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<unk>", "<pad>", *SPECIALS)}
    text = "a photo of 一只猫 在河边"
    before = tokenizer.encode(text)
    assert tokenizer.add_special_tokens({"additional_special_tokens": ["<caption_end>"]}) == 1
    assert tokenizer.add_tokens(["<region>"]) == 1
    assert tokenizer.add_special_tokens({"pad_token": "[PAD]"}) == 1  # a new pad token is accepted
    new_ids = tokenizer.convert_tokens_to_ids(["<caption_end>", "<region>", "[PAD]"])
    assert min(new_ids) >= len(sp) + OFFSET + 3  # after the icetk layout: no existing id moves
    assert tokenizer.pad_token_id == new_ids[2]
    with_added = "a cat<caption_end> dog <region>"
    ids = tokenizer.encode(with_added)
    assert new_ids[0] in ids and new_ids[1] in ids  # matched as units, not segmented
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a cat dog <region>"

    tokenizer.save_pretrained(tmp_path)
    loaded = CogLMTokenizer.from_pretrained(tmp_path)
    assert loaded.convert_tokens_to_ids(["<caption_end>", "<region>", "[PAD]"]) == new_ids
    assert loaded.encode(with_added) == ids
    assert loaded.pad_token == "[PAD]" and loaded.pad_token_id == new_ids[2]
    assert "<caption_end>" in loaded.all_special_tokens
    assert {token: loaded.convert_tokens_to_ids(token) for token in layout} == layout
    assert loaded.encode(text) == before == [i + OFFSET for i in sp.encode(text)]
    # the CogView2 tokens still segment like icetk (a leading one keeps the dummy-prefix piece before it)
    assert loaded.tokenize("<start_of_image> cat") == ["▁", "<start_of_image>", "▁cat"]
    assert loaded.model_max_length == 77


def test_init_kwargs_record_the_constructor_arguments(spm_files, tmp_path):
    tokenizer = CogLMTokenizer.from_sentencepiece(spm_files / "text.model", text_token_offset=OFFSET,
                                                  padding_side="left", split_special_tokens=True)
    for name, value in (("text_token_offset", OFFSET), ("boi_token_id", tokenizer.boi_token_id),
                        ("padding_side", "left"), ("split_special_tokens", True), ("unk_token", "<unk>")):
        assert tokenizer.init_kwargs[name] == value, name
    tokenizer.add_special_tokens({"additional_special_tokens": ["<caption_end>"]})
    # split_special_tokens=True: added special tokens go through the segmenter, as asked
    assert tokenizer.convert_tokens_to_ids("<caption_end>") not in tokenizer.encode("a<caption_end>")
    tokenizer.save_pretrained(tmp_path)
    loaded = CogLMTokenizer.from_pretrained(tmp_path)
    assert loaded.init_kwargs["padding_side"] == "left" and loaded.split_special_tokens
