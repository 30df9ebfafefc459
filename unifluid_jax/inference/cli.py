"""`--mode=sample|caption|vqa|edit|eval` of unifluid_jax.main: a trained run's checkpoint on user inputs.

    python -m unifluid_jax.main --config=configs/unifluid_demo.py:data=DIR --workdir=RUN --mode=sample \
        --config.infer.prompts=prompts.txt
    ... --mode=caption --config.infer.images=IMAGE_DIR          -> RUN/infer/captions.jsonl
    ... --mode=vqa --config.infer.questions=q.jsonl             ({"image": path, "question": ...} per line)
    ... --mode=edit --config.infer.pairs=edits.jsonl            ({"image": path, "instruction": ...} per line)
    ... --mode=eval                                             (evals/suite.py on config.eval)

`config.infer` (unifluid_jax/presets.py): inputs above, `out` (default RUN/infer), `step` (-1: latest), sampling
(`num_steps`, `cfg_scale`, `cfg_schedule`, `temperature`, `order`), decoding (`method`, `beam_size`), `batch_size`,
`seed`. Inputs are checked before anything compiles: an empty file, an unreadable image, a prompt that does
not fit, or a checkpoint that does not match the config stop with one error naming the item.
"""
from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
from PIL import Image

from unifluid_jax import fs
from unifluid_jax.config import ConfigError
from unifluid_jax.data import images
from unifluid_jax.data.tokenizer import Tokenizer
from unifluid_jax.evals import suite
from unifluid_jax.inference import decode, generate
from unifluid_jax.models import unifluid
from unifluid_jax.tasks.unifluid import UniFluidTask
from unifluid_jax.train import checkpoint as ckpt_lib
from unifluid_jax.train import sharding

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_model(config, workdir: str):
    """(model, variables) from the run's checkpoint; a clear error if its params do not fit the config."""
    task = UniFluidTask(config)
    step = int(config.infer.step)
    try:
        params = ckpt_lib.serving_params(ckpt_lib.load_numpy(workdir, None if step < 0 else step))
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConfigError(f"--workdir={workdir}: no usable checkpoint ({e}); train first or fix --workdir") from e
    expected = sharding.unbox_abstract(jax.eval_shape(task.init_params, jax.random.key(0)))
    expected = jax.tree_util.tree_flatten_with_path(expected)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    for path, leaf in expected:
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ConfigError(f"checkpoint in {workdir} does not match config.model: it has no param {name}")
        if tuple(got[path].shape) != tuple(leaf.shape):
            raise ConfigError(f"checkpoint in {workdir} does not match config.model: param {name} has shape "
                              f"{tuple(got[path].shape)}, the config expects {tuple(leaf.shape)}")
    return task.model, {"params": jax.tree.map(jax.numpy.asarray, params)}


def _out_dir(config, workdir: str) -> str:
    out = config.infer.out or os.path.join(workdir, "infer")
    fs.makedirs(out)
    return out


def _lines(path: str, what: str) -> list[str]:
    if not path:
        raise ConfigError(f"config.infer.{what} is empty: give a file")
    try:
        with fs.open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConfigError(f"config.infer.{what}={path!r} cannot be read: {e}") from e
    if not lines:
        raise ConfigError(f"config.infer.{what}={path!r} has no entries")
    return lines


def _jsonl(path: str, what: str, keys: tuple[str, ...]) -> list[dict]:
    rows = []
    for i, line in enumerate(_lines(path, what)):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {i + 1}: not JSON ({e})") from e
        missing = [k for k in keys if k not in row]
        if missing:
            raise ConfigError(f"{path} line {i + 1}: missing {missing}; each line needs {list(keys)}")
        rows.append(row)
    return rows


def _image(path: str, size: int, resample: str, base: str = "") -> np.ndarray:
    full = path if fs.is_remote(path) or os.path.isabs(path) or not base else os.path.join(base, path)
    try:  # the pipeline's decode / validate rules (data/images.py); the error names the file
        return images.load_file(full, size, resample)
    except images.ImageError as e:
        raise ConfigError(str(e)) from e


def _tokenizer(config) -> Tokenizer:
    return Tokenizer(config.data.tokenizer)


def _check_prompts(model_cfg, prompts, tok, task="t2i"):
    """Fail on the first bad prompt before compiling (text_batch names the item)."""
    try:
        generate.text_batch(task, prompts, model_cfg.max_text_len, tokenizer=tok, vocab_size=model_cfg.llm.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _save_png(path: str, image_u8: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG")
    fs.write_bytes(path, buf.getvalue())


def _generate_all(config, model, variables, tok, prompts, **sources):
    inf, bs = config.infer, int(config.infer.batch_size)
    out = []
    for i in range(0, len(prompts), bs):
        chunk = {k: v[i:i + bs] for k, v in sources.items()}
        batch = generate.prompt_batch(model.config, prompts[i:i + bs], tokenizer=tok, **chunk)
        imgs, _ = generate.generate_images(
            model, variables, batch, jax.random.fold_in(jax.random.key(int(inf.seed)), i),
            num_steps=int(inf.num_steps), cfg_scale=float(inf.cfg_scale), cfg_schedule=inf.cfg_schedule,
            temperature=float(inf.temperature), order=inf.order)
        out.append(generate.to_uint8(imgs))
    return np.concatenate(out)


def sample(config, workdir: str) -> dict:
    tok = _tokenizer(config)
    prompts = _lines(config.infer.prompts, "prompts")
    model_cfg = unifluid.config_from_dict(config.model)
    _check_prompts(model_cfg, prompts, tok)
    model, variables = load_model(config, workdir)
    images = _generate_all(config, model, variables, tok, prompts)
    out = _out_dir(config, workdir)
    for i, im in enumerate(images):
        _save_png(os.path.join(out, f"sample_{i:04d}.png"), im)
    suite.save_grid(os.path.join(out, "samples_grid.png"), images)
    with fs.open(os.path.join(out, "samples.jsonl"), "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"prompt": p, "file": f"sample_{i:04d}.png"}) + "\n")
    print(f"{len(images)} images -> {out}")
    return {"num_images": len(images), "out": out}


def edit(config, workdir: str) -> dict:
    tok = _tokenizer(config)
    rows = _jsonl(config.infer.pairs, "pairs", ("image", "instruction"))
    model_cfg = unifluid.config_from_dict(config.model)
    base = os.path.dirname(config.infer.pairs)
    sources = {}
    if "siglip" in model_cfg.edit_source and model_cfg.n_und:
        sources["source_und"] = np.stack([_image(r["image"], model_cfg.siglip.image_size, "bilinear", base)
                                          for r in rows])
    if "vae" in model_cfg.edit_source:
        sources["source_gen"] = np.stack([_image(r["image"], model_cfg.vae.image_size, "bicubic", base)
                                          for r in rows])
    instructions = [r["instruction"] for r in rows]
    _check_prompts(model_cfg, instructions, tok, "edit")
    model, variables = load_model(config, workdir)
    images = _generate_all(config, model, variables, tok, instructions, **sources)
    out = _out_dir(config, workdir)
    for i, im in enumerate(images):
        _save_png(os.path.join(out, f"edit_{i:04d}.png"), im)
    print(f"{len(images)} edited images -> {out}")
    return {"num_images": len(images), "out": out}


def _answer(config, model, variables, tok, images, questions, task):
    inf, bs = config.infer, int(config.infer.batch_size)
    out = []
    for i in range(0, len(images), bs):
        qs = None if questions is None else questions[i:i + bs]
        batch = decode.question_batch(model.config, images[i:i + bs], qs, task=task, tokenizer=tok,
                                      caption_prompt=config.data.caption_prompt)
        res = decode.decode_text(model, variables, batch, jax.random.fold_in(jax.random.key(int(inf.seed)), i),
                                 method=inf.method, beam_size=int(inf.beam_size), temperature=float(inf.temperature))
        out.extend(decode.detokenize(tok, res["tokens"]))
    return out


def caption(config, workdir: str) -> dict:
    tok = _tokenizer(config)
    folder = config.infer.images
    if not folder or not fs.isdir(folder):
        raise ConfigError(f"config.infer.images={folder!r} is not a folder of images")
    files = sorted(f for f in fs.listdir(folder) if f.lower().endswith(IMAGE_EXTS))
    if not files:
        raise ConfigError(f"config.infer.images={folder!r} holds no images ({', '.join(IMAGE_EXTS)})")
    model_cfg = unifluid.config_from_dict(config.model)
    images = np.stack([_image(os.path.join(folder, f), model_cfg.siglip.image_size, "bilinear") for f in files])
    model, variables = load_model(config, workdir)
    captions = _answer(config, model, variables, tok, images, None, "caption")
    path = os.path.join(_out_dir(config, workdir), "captions.jsonl")
    with fs.open(path, "w") as f:
        for name, cap in zip(files, captions):
            f.write(json.dumps({"image": name, "caption": cap}) + "\n")
    print(f"{len(captions)} captions -> {path}")
    return {"num_images": len(files), "out": path}


def vqa(config, workdir: str) -> dict:
    tok = _tokenizer(config)
    rows = _jsonl(config.infer.questions, "questions", ("image", "question"))
    model_cfg = unifluid.config_from_dict(config.model)
    base = os.path.dirname(config.infer.questions)
    images = np.stack([_image(r["image"], model_cfg.siglip.image_size, "bilinear", base) for r in rows])
    questions = [r["question"] for r in rows]
    _check_prompts(model_cfg, questions, tok, "vqa")
    model, variables = load_model(config, workdir)
    answers = _answer(config, model, variables, tok, images, questions, "vqa")
    path = os.path.join(_out_dir(config, workdir), "answers.jsonl")
    with fs.open(path, "w") as f:
        for r, a in zip(rows, answers):
            f.write(json.dumps({**r, "answer": a}) + "\n")
    print(f"{len(answers)} answers -> {path}")
    return {"num_questions": len(rows), "out": path}


def evaluate(config, workdir: str) -> dict:
    model, variables = load_model(config, workdir)
    res = suite.evaluate_section(model, variables, config.eval, caption_prompt=config.data.caption_prompt,
                                 out_dir=os.path.join(_out_dir(config, workdir), "eval"))
    print(json.dumps(res, indent=1, default=float))
    return res
