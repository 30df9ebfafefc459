"""Tokenizer: Gemma id convention, "\\n" as its own piece, round trip, pickling."""
import pickle

import pytest

from unifluid_jax.data import shapes, tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = []
    for i in range(300):
        e = shapes.example("train", i, size=24)
        texts += [e["caption"], e["prompt"], e["question"] + "\n" + e["answer"], e["instruction"]]
    path = tokenizer.train_tokenizer(texts + shapes.vocabulary_texts(), str(tmp_path_factory.mktemp("tok") / "t"),
                                     vocab_size=256)
    return tokenizer.Tokenizer(path)


def test_special_ids_and_roundtrip(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(1) == "<eos>" and tok.id_to_piece(2) == "<bos>"
    assert len(tok.sep_ids) == 1 and tok.id_to_piece(tok.sep_ids[0]) == "\n"
    assert 40 < tok.vocab_size <= 256
    text = "how many red circles are there?\nthree"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == 2 and ids[-1] == 1 and tok.sep_ids[0] in ids and 3 not in ids
    assert tok.decode(ids) == text
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_bad_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        tokenizer.Tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError):
        tokenizer.train_tokenizer([], str(tmp_path / "x"))
