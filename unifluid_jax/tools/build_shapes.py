"""Builds the embedded shapes dataset: ArrayRecord shards per split and task, a SentencePiece model, metadata.

    python -m unifluid_jax.tools.build_shapes --out=DIR --size=64 --num_train=20000 --seed=0

Writes
    DIR/{train,val,test}/{t2i,caption,vqa,edit}-NNNNN-of-NNNNN.array_record   (records.py schema; each record
        also carries `meta`, the JSON scene metadata; edit `meta2`, the target scene; t2i records drawn for a
        GenEval-grammar prompt (--geneval_fraction) `spec`, the prompt's structured spec)
    DIR/tokenizer.model          SentencePiece model (Gemma ids) trained on every text of the dataset
    DIR/geneval_prompts.jsonl    GenEval-style evaluation prompts with their specs
    DIR/metadata.json            sizes, counts, seed, palette, paths
Same arguments -> identical files.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from absl import app, flags
from PIL import Image

from unifluid_jax import fs
from unifluid_jax.data import layout, records, shapes, tokenizer

SPLITS = ("train", "val", "test")


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # PNG: lossless, so colours stay exactly on the palette
    return buf.getvalue()


def split_records(split: str, index: int, size: int, seed: int, geneval_fraction: float = 0.0) -> dict[str, dict]:
    """The four records (one per task) derived from scene `index` of `split`. A `geneval_fraction` of the t2i
    records instead show a scene drawn for a GenEval-grammar prompt (`shapes.geneval_example`)."""
    e = shapes.example(split, index, size=size, seed=seed)
    image = png(e["image"])
    meta = json.dumps(e["scene"])
    rid = f"{split}/{index}"
    t2i = {"id": rid, "task": "t2i", "image": image, "caption": e["prompt"], "meta": meta}
    if np.random.default_rng([seed, shapes.split_seed(split, index), 2]).random() < geneval_fraction:
        g = shapes.geneval_example(split, index, size=size, seed=seed)
        t2i.update(image=png(g["image"]), caption=g["prompt"], meta=json.dumps(g["scene"]),
                   spec=json.dumps(g["spec"]))
    return {
        "t2i": t2i,
        "caption": {"id": rid, "task": "caption", "image": image, "caption": e["caption"], "meta": meta},
        "vqa": {"id": rid, "task": "vqa", "image": image, "question": e["question"], "answer": e["answer"],
                "qtype": e["qtype"], "meta": meta},
        "edit": {"id": rid, "task": "edit", "image": image, "image2": png(e["target_image"]),
                 "instruction": e["instruction"], "edit_kind": e["edit_kind"], "meta": meta,
                 "meta2": json.dumps(e["target_scene"])},
    }


def build(out: str, size: int = 64, num_train: int = 20000, num_val: int = 500, num_test: int = 500,
          seed: int = 0, num_shards: int = 2, vocab_size: int = 256, num_geneval: int = 50,
          caption_prompt: str = "caption en", geneval_fraction: float = 0.25) -> dict:
    """Builds the dataset (see module docstring); returns the metadata dict."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    texts = set(shapes.vocabulary_texts()) | {caption_prompt}
    paths = {}
    for split in SPLITS:
        n = counts[split]
        if n <= 0:
            continue
        writers = {t: records.RecordWriter(os.path.join(out, split, t), num_shards if n >= num_shards else 1)
                   for t in layout.TASKS}
        for i in range(n):
            for task, rec in split_records(split, i, size, seed, geneval_fraction).items():
                writers[task].write(rec)
                for k in ("caption", "question", "answer", "instruction"):
                    if k in rec:
                        texts.add(rec[k])
        for w in writers.values():
            w.close()
        paths[split] = {t: os.path.relpath(os.path.join(out, split, t), out) for t in layout.TASKS}
    geneval = shapes.geneval_prompts(seed, num_geneval)
    with fs.open(os.path.join(out, "geneval_prompts.jsonl"), "w") as f:
        for prompt, spec in geneval:
            f.write(json.dumps({"prompt": prompt, "spec": spec}) + "\n")
            texts.add(prompt)
    tok_path = tokenizer.train_tokenizer(sorted(texts), os.path.join(out, "tokenizer"), vocab_size)
    meta = {"dataset": "shapes", "size": size, "seed": seed, "counts": counts, "num_shards": num_shards,
            "tasks": list(layout.TASKS), "splits": paths, "tokenizer": os.path.basename(tok_path),
            "vocab_size": tokenizer.Tokenizer(tok_path).vocab_size, "geneval_prompts": "geneval_prompts.jsonl",
            "palette": shapes.PALETTE, "background": shapes.BACKGROUND, "shapes": list(shapes.SHAPES),
            "sizes": list(shapes.SIZES), "caption_prompt": caption_prompt, "geneval_fraction": geneval_fraction}
    with fs.open(os.path.join(out, "metadata.json"), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return meta


FLAGS = flags.FLAGS


def _define_flags():
    """Flags are defined only when run as a program, so importing `build` never clashes with other flags."""
    flags.DEFINE_string("out", None, "output directory", required=True)
    flags.DEFINE_integer("size", 64, "image size (px)")
    flags.DEFINE_integer("num_train", 20000, "training scenes (each gives one record per task)")
    flags.DEFINE_integer("num_val", 500, "validation scenes")
    flags.DEFINE_integer("num_test", 500, "test scenes")
    flags.DEFINE_integer("seed", 0, "dataset seed")
    flags.DEFINE_integer("num_shards", 2, "ArrayRecord shards per split and task")
    flags.DEFINE_integer("vocab_size", 256, "SentencePiece vocabulary size (soft limit)")
    flags.DEFINE_integer("num_geneval", 50, "GenEval prompts per category")
    flags.DEFINE_float("geneval_fraction", 0.25, "fraction of t2i records drawn for GenEval-grammar prompts")


def main(argv):
    del argv
    meta = build(FLAGS.out, FLAGS.size, FLAGS.num_train, FLAGS.num_val, FLAGS.num_test, FLAGS.seed,
                 FLAGS.num_shards, FLAGS.vocab_size, FLAGS.num_geneval,
                 geneval_fraction=FLAGS.geneval_fraction)
    print(json.dumps({k: meta[k] for k in ("counts", "vocab_size", "size")}))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
