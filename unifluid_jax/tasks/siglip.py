"""SigLIP training task: big_vision's sigmoid image-text loss on image-caption pairs (SPEC section 11).

config.model: the two-tower section (models/two_towers.py): image (a SigLIP section, pool='map'), text,
              temperature_init, bias_init.
config.data:  a pipeline section (data/pipeline.py) whose sources all have task='caption': the image is read
              exactly as UniFluid's understanding input (`image_und`, `data.und_size`, `data.und_resize`) and
              the caption (answer tokens + EOS) is left-aligned into the text tower's [B, max_text_len] input.
config.siglip_train: eval_sources (held-out caption sources), eval_examples (retrieval gallery size).
Every evaluation writes `siglip_stats.json` to the workdir: held-out image->text and text->image retrieval
top-1 over the whole gallery, with its chance level.

UniFluid loads the trained image tower with
`checkpoint.init_subtrees = [dict(workdir=THIS_RUN, src='img', dst='siglip')]`.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.config import check
from unifluid_jax.data import pipeline
from unifluid_jax.data.tokenizer import Tokenizer
from unifluid_jax.models import two_towers
from unifluid_jax.tasks.inputs import SkipCounter, host_iterator
from unifluid_jax.train import task as task_lib

IMAGE_TOWER = "img"  # the params subtree that UniFluid's `siglip` loads


def caption_tokens(text_tokens: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """Caption-task text segments [B, L] -> their answers (caption + EOS) left-aligned, zero-padded [B, L]."""
    mask = np.asarray(loss_mask) > 0
    order = np.argsort(~mask, axis=1, kind="stable")  # answer positions first, in their order
    return np.take_along_axis(np.where(mask, text_tokens, 0), order, axis=1).astype(np.int32)


class CaptionPairs(SkipCounter):
    """Pipeline batches -> {'image': [B,U,U,3], 'text': [B,L]} (and 'valid' [B])."""

    def __next__(self):
        b = super().__next__()
        return {"image": b["image_und"], "text": caption_tokens(b["text_tokens"], b["text_loss_mask"]),
                "valid": b["valid"]}


def retrieval_top1(zimg: np.ndarray, ztxt: np.ndarray, texts: np.ndarray) -> dict[str, float]:
    """Image->text and text->image top-1 over the whole gallery. Identical captions (a one-object scene can
    repeat) count as the same answer, and the chance level is the expected top-1 of a random ranking."""
    sim = zimg @ ztxt.T
    _, key = np.unique(texts, axis=0, return_inverse=True)
    key = key.reshape(-1)
    same = key[:, None] == key[None, :]
    n = len(key)
    return {"i2t_top1": float(np.mean(same[np.arange(n), sim.argmax(axis=1)])),
            "t2i_top1": float(np.mean(same[sim.argmax(axis=0), np.arange(n)])),
            "chance_top1": float(np.mean(same.sum(axis=1) / n)), "num_examples": int(n)}


class SigLIPTask(task_lib.Task):
    batch_logical_axes = {"image": ("act_batch", None, None, None), "text": ("act_batch", None),
                          "valid": ("act_batch",)}

    def __init__(self, config):
        super().__init__(config)
        self.model_config = two_towers.config_from_dict(config.model)
        self.model = two_towers.TwoTowers(self.model_config)

    @classmethod
    def validate_config(cls, config) -> None:
        two_towers.validate_config(config.model, "model")
        pipeline.validate_config(config.data, "data")
        cfg = two_towers.config_from_dict(config.model)
        check(config.data.und_size == cfg.image.image_size, "data.und_size",
              f"is {config.data.und_size} but the image tower expects {cfg.image.image_size} px images "
              "(model.image.image_size)")
        sources = list(config.data.sources) + list(config.siglip_train.eval_sources)
        for i, s in enumerate(sources):
            where = f"data.sources[{i}]" if i < len(config.data.sources) else \
                f"siglip_train.eval_sources[{i - len(config.data.sources)}]"
            check(s.get("task") == "caption", f"{where}.task",
                  f"must be 'caption' (image-caption pairs), got {s.get('task')!r}")
        check(config.siglip_train.eval_examples >= 2, "siglip_train.eval_examples",
              f"retrieval needs a gallery of >= 2, got {config.siglip_train.eval_examples}")
        vocab = Tokenizer(config.data.tokenizer).vocab_size
        check(vocab <= cfg.text.vocab_size, "model.text.vocab_size",
              f"is {cfg.text.vocab_size} but the tokenizer {config.data.tokenizer} has {vocab} pieces")

    def init_params(self, rng):
        s, L = self.model_config.image.image_size, self.config.data.max_text_len
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, L), jnp.int32))["params"]

    def loss_fn(self, params, batch, rng, step):
        del rng, step
        zimg, ztxt, t, b = self.model.apply({"params": params}, batch["image"], batch["text"])
        loss = two_towers.sigmoid_loss(zimg, ztxt, t, b)
        sim = zimg @ ztxt.T
        n = sim.shape[0]
        top1 = jnp.mean((jnp.argmax(sim, axis=1) == jnp.arange(n)).astype(jnp.float32))
        return loss, {"temperature": t, "bias": b, "batch_i2t_top1": top1}

    def make_input(self, config, process_index: int, process_count: int):
        return self.track_input(CaptionPairs(host_iterator(config, process_index, process_count)))

    def tokens_per_batch(self, batch) -> int:
        return int(np.asarray(batch["image"]).shape[0])

    # -- evaluation -----------------------------------------------------------------------------------

    def heldout_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Up to siglip_train.eval_examples (image, caption tokens) pairs of the held-out sources, in order."""
        cfg = self.config
        data = cfg.data.copy_and_resolve_references()
        with data.unlocked():
            data.sources = list(cfg.siglip_train.eval_sources)
            data.shuffle, data.num_epochs, data.worker_count = False, 1, 0
        it = CaptionPairs(pipeline.make_iterator(data, shard_index=0, shard_count=1,
                                                 batch_size=cfg.train.batch_size))
        images, texts, n = [], [], 0
        for batch in it:
            keep = batch["valid"] > 0
            images.append(batch["image"][keep])
            texts.append(batch["text"][keep])
            n += int(keep.sum())
            if n >= cfg.siglip_train.eval_examples:
                break
        m = int(cfg.siglip_train.eval_examples)
        return np.concatenate(images)[:m], np.concatenate(texts)[:m]

    @functools.cached_property
    def _embed(self):
        return jax.jit(lambda params, images, texts: self.model.apply({"params": params}, images, texts))

    def embed(self, params, images, texts) -> tuple[np.ndarray, np.ndarray]:
        """Normalised embeddings of aligned (image, text) rows, in training-batch-sized chunks."""
        bs = self.config.train.batch_size
        zi, zt = [], []
        for i in range(0, len(images), bs):
            im, tx = images[i:i + bs], texts[i:i + bs]
            pad = bs - len(im)  # one compiled shape for the last, short chunk
            im = np.concatenate([im, np.zeros((pad,) + im.shape[1:], im.dtype)])
            tx = np.concatenate([tx, np.zeros((pad,) + tx.shape[1:], tx.dtype)])
            a, b, _, _ = self._embed(params, jnp.asarray(im), jnp.asarray(tx))
            zi.append(np.asarray(a)[:bs - pad])
            zt.append(np.asarray(b)[:bs - pad])
        return np.concatenate(zi), np.concatenate(zt)

    def evaluate(self, params) -> dict[str, float]:
        images, texts = self.heldout_pairs()
        return retrieval_top1(*self.embed(params, images, texts), texts)

    def eval_fn(self, params, step, writer):
        out = self.evaluate(params)
        out["temperature"] = float(np.exp(np.asarray(params["t"])[0]))
        out["bias"] = float(np.asarray(params["b"])[0])
        out["step"] = int(step)
        writer.scalars(step, {f"eval/siglip_{k}": v for k, v in out.items() if k != "step"})
        if jax.process_index() == 0 and getattr(writer, "workdir", None):
            path = os.path.join(writer.workdir, "siglip_stats.json")
            history = []  # earlier evaluations of this run (kept across restarts), for retrieval vs steps
            if os.path.exists(path):
                with open(path) as f:
                    history = [h for h in json.load(f).get("history", []) if h["step"] < step]
            history.append({k: out[k] for k in ("step", "i2t_top1", "t2i_top1")})
            with open(path, "w") as f:
                json.dump({**out, "history": history}, f, indent=1)
        return out
