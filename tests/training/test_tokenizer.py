"""The tokenizer: round trips, OOV, vocabulary cap, word joining, unicode, JSON form."""

from __future__ import annotations

import json

import pytest

from training.tokenizer import OOV_ID, PADDING_ID, Tokenizer, TokenizerError

TEXT = "The cat sat on the mat.\nThe dog, too!\n\nDon't (really) stop: 42% done?"


@pytest.mark.parametrize("level", ["char", "word"])
def test_round_trip_of_the_fitted_text(level: str) -> None:
    tok = Tokenizer(level=level).fit_on_texts([TEXT])
    ids = tok.encode(TEXT)
    assert OOV_ID not in ids and PADDING_ID not in ids
    if level == "char":
        assert tok.decode(ids) == TEXT
    else:
        # Word level keeps every token and rejoins them into natural text.
        assert tok.split(tok.decode(ids)) == tok.split(TEXT)
        assert tok.decode(tok.encode("The cat sat on the mat.")) == "The cat sat on the mat."


def test_ids_follow_frequency_after_padding_and_oov() -> None:
    tok = Tokenizer(level="word").fit_on_texts(["b a a c a b"])
    assert tok.vocab[:2] == ["", "<unk>"]
    assert tok.vocab[2:] == ["a", "b", "c"]
    assert tok.vocab_size == 5
    assert tok.word_index["a"] == 2 and tok.index_word[2] == "a"


@pytest.mark.parametrize("level,unknown", [("char", "Z"), ("word", "zebra")])
def test_unknown_tokens_encode_to_oov(level: str, unknown: str) -> None:
    tok = Tokenizer(level=level).fit_on_texts(["the cat sat"])
    ids = tok.encode(f"the {unknown}")
    assert ids[-1] == OOV_ID
    assert tok.decode([OOV_ID]) == tok.oov_token


def test_max_vocab_caps_the_vocabulary_and_rarer_words_become_oov() -> None:
    tok = Tokenizer(level="word", num_words=4).fit_on_texts(["a a a b b c"])
    assert tok.vocab == ["", "<unk>", "a", "b"]
    assert tok.encode("a b c") == [2, 3, OOV_ID]
    with pytest.raises(TokenizerError, match="num_words"):
        Tokenizer(level="word", num_words=2)


def test_word_level_splits_punctuation_and_newlines_and_joins_naturally() -> None:
    tok = Tokenizer(level="word").fit_on_texts([TEXT])
    assert tok.split("Hello, world!\nBye (now).") == ["Hello", ",", "world", "!", "\n", "Bye", "(", "now", ")", "."]
    assert tok.split("don't") == ["don't"]
    text = "Hello, world!\nBye (now)."
    tok2 = Tokenizer(level="word").fit_on_texts([text])
    assert tok2.decode(tok2.encode(text)) == text
    assert tok2.sequences_to_texts(tok2.texts_to_sequences([text, "world!"])) == [text, "world!"]


def test_piece_by_piece_decoding_equals_whole_decoding() -> None:
    for level in ("char", "word"):
        tok = Tokenizer(level=level).fit_on_texts([TEXT])
        ids = tok.encode(TEXT)
        pieces, prev = [], None
        for i in ids:
            pieces.append(tok.piece(prev, i))
            prev = i
        assert "".join(pieces) == tok.decode(ids)


@pytest.mark.parametrize("level", ["char", "word"])
def test_unicode_accents_emoji_and_cjk_survive(level: str) -> None:
    text = "Café naïve 🙂 crème brûlée 😀 中文字符 日本語 한국어 Ünïcödé"
    tok = Tokenizer(level=level).fit_on_texts([text])
    ids = tok.encode(text)
    assert OOV_ID not in ids
    assert tok.decode(ids) == text
    # Decomposed accents are normalised (NFC) to the same ids as composed ones.
    assert tok.encode("Cafe\u0301") == tok.encode("Café")


def test_lowercase_option() -> None:
    tok = Tokenizer(level="char", lowercase=True).fit_on_texts(["ABC abc"])
    assert tok.encode("ABC") == tok.encode("abc")


@pytest.mark.parametrize("level", ["char", "word"])
def test_json_round_trip_keeps_every_behaviour(level: str, tmp_path) -> None:
    tok = Tokenizer(level=level, num_words=30, lowercase=True).fit_on_texts([TEXT + " 中文 🙂"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["level"] == level and data["vocab"] == tok.vocab
    again = Tokenizer.load(str(path))
    assert again.vocab == tok.vocab and again.level == level and again.lowercase
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.decode(tok.encode(TEXT)) == tok.decode(tok.encode(TEXT))
    assert Tokenizer.from_json(tok.to_json()).to_dict() == tok.to_dict()


def test_bad_tokenizer_input_names_the_problem() -> None:
    with pytest.raises(TokenizerError, match="level"):
        Tokenizer(level="byte")
    with pytest.raises(TokenizerError, match="not valid"):
        Tokenizer.from_json("{nope")
    with pytest.raises(TokenizerError, match="format"):
        Tokenizer.from_json('{"format": "other"}')
    with pytest.raises(TokenizerError, match="no vocabulary"):
        Tokenizer().encode("x")
    tok = Tokenizer().fit_on_texts(["ab"])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.piece(None, 99)
