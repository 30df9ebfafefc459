"""SentencePiece tokenizer with the Gemma id convention (pad 0, eos 1, bos 2, unk 3).

A Gemma `tokenizer.model` loads as-is. `train_tokenizer` trains a small model in-process for the embedded
shapes dataset, with "\\n" as its own piece (the PaliGemma question/answer separator, `Tokenizer.sep_ids`).
The wrapper pickles by value (the serialized model proto), so it can be shipped to grain worker processes.
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence

import sentencepiece as spm

from unifluid_jax import fs
from unifluid_jax.data import layout

SEP = "\n"


class Tokenizer:
    """Encode/decode text with a SentencePiece model (path or serialized proto bytes)."""

    def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
        if (model_path is None) == (model_proto is None):
            raise ValueError("Tokenizer: pass exactly one of model_path or model_proto")
        if model_proto is None:
            if not fs.exists(model_path):  # local or a URI (gs://...): the path layer
                raise FileNotFoundError(f"tokenizer model not found: {model_path}")
            model_proto = fs.read_bytes(model_path)
        self._proto = bytes(model_proto)
        self._sp = spm.SentencePieceProcessor()
        self._sp.LoadFromSerializedProto(self._proto)
        ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.bos_id(), self._sp.unk_id())
        want = (layout.PAD_ID, layout.EOS_ID, layout.BOS_ID, layout.UNK_ID)
        if ids != want:
            raise ValueError(f"tokenizer special ids (pad, eos, bos, unk) = {ids}; the Gemma convention "
                             f"{want} is required")
        self.sep_ids = tuple(self._encode_sep())

    def _encode_sep(self) -> list[int]:
        # A bare "\n" is mangled by SentencePiece's whitespace handling in some models; take the piece
        # directly when it exists (Gemma and our trained models have it), else fall back to encoding.
        pid = self._sp.PieceToId(SEP)
        if pid != self._sp.unk_id():
            return [pid]
        return list(self._sp.EncodeAsIds(SEP))

    def __getstate__(self):
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(model_proto=state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.GetPieceSize()

    pad_id, eos_id, bos_id, unk_id = layout.PAD_ID, layout.EOS_ID, layout.BOS_ID, layout.UNK_ID

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(self._sp.EncodeAsIds(text))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids, dropping pad/bos and stopping at the first eos. Ids past the tokenizer's vocabulary
        (a model's embedding table may be padded, like Gemma's 256128 rows) decode as unk."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            out.append(i if 0 <= i < self.vocab_size else self.unk_id)
        return self._sp.DecodeIds(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))


def train_tokenizer(texts: Iterable[str], out_prefix: str, vocab_size: int = 512,
                    user_defined_symbols: Sequence[str] = (SEP,)) -> str:
    """Trains a unigram SentencePiece model in-process; writes `{out_prefix}.model`, returns its path.

    The vocabulary is soft-limited (`hard_vocab_limit=False`): a small closed-vocabulary corpus may yield
    fewer pieces than `vocab_size`.
    """
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no texts")
    fs.makedirs(fs.dirname(fs.absolute(out_prefix)))
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=layout.PAD_ID, eos_id=layout.EOS_ID, bos_id=layout.BOS_ID, unk_id=layout.UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=list(user_defined_symbols), hard_vocab_limit=False,
        character_coverage=1.0, split_digits=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", num_threads=1, minloglevel=2,
        train_extremely_large_corpus=False)
    path = out_prefix + ".model"
    fs.write_bytes(path, model.getvalue())
    return path
