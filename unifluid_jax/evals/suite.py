"""Evaluate a UniFluid model on a shapes dataset (tools/build_shapes.py): the numbers the demo and
`--mode=eval` report, and the trainer's periodic eval / sample hooks.

- generation: shapes-GenEval (six categories + overall) on the dataset's GenEval prompts, plus a Fréchet
  distance (simple shapes features, NOT Inception) between generated and real held-out t2i images;
- captioning: CIDEr-D and exact match against the held-out captions (greedy decoding);
- VQA: exact match and VQAv2-style soft accuracy (greedy decoding);
- the VAE's ceiling on shapes-GenEval: scenes drawn for the same prompts, encoded and decoded by the frozen
  VAE (generation cannot score higher than its decoder allows);
- a PNG grid of generated samples, each prompt written under its image;
- beside every score its chance baseline (`evals/chance.py`: the same outputs scored against the other
  examples' targets), so a score is read as "above chance by this much".
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unifluid_jax.data import pipeline, records, shapes
from unifluid_jax.data.tokenizer import Tokenizer
from unifluid_jax.evals import chance, cider, fid, geneval, vqa
from unifluid_jax.inference import decode, generate
from unifluid_jax.models.unifluid import UniFluid


def _records(data_dir: str, split: str, task: str, limit: int) -> list[dict]:
    out = []
    for rec in records.read_records(os.path.join(data_dir, split, task + "*")):
        out.append(rec)
        if len(out) >= limit:
            break
    return out


def _batched(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def geneval_prompts(data_dir: str, limit: int) -> list[tuple[str, dict]]:
    """Up to `limit` (prompt, spec) pairs, round-robin over the GenEval categories."""
    with open(os.path.join(data_dir, "geneval_prompts.jsonl")) as f:
        items = [json.loads(line) for line in f if line.strip()]
    by_tag: dict[str, list] = {}
    for it in items:
        by_tag.setdefault(it["spec"].get("tag", ""), []).append((it["prompt"], it["spec"]))
    out, i = [], 0
    while len(out) < min(limit, len(items)):
        for group in by_tag.values():
            if i < len(group) and len(out) < limit:
                out.append(group[i])
        i += 1
    return out


def generate_for_prompts(model: UniFluid, params, tokenizer, prompts: Sequence[str], rng, *, batch_size: int,
                         num_steps: int, cfg_scale: float, temperature: float,
                         cfg_schedule: str = "linear") -> np.ndarray:
    images = []
    for i, chunk in enumerate(_batched(list(prompts), batch_size)):
        n = len(chunk)
        chunk = list(chunk) + [chunk[-1]] * (batch_size - n)  # one compiled shape
        batch = generate.prompt_batch(model.config, chunk, tokenizer=tokenizer)
        imgs, _ = generate.generate_images(model, params, batch, jax.random.fold_in(rng, i), num_steps=num_steps,
                                           cfg_scale=cfg_scale, temperature=temperature, cfg_schedule=cfg_schedule)
        images.append(generate.to_uint8(imgs)[:n])
    return np.concatenate(images)


@functools.lru_cache(maxsize=4)
def _roundtrip_fn(model: UniFluid):  # cached: periodic evals reuse the compiled program
    return jax.jit(lambda p, x: model.apply(p, model.apply(p, x, method=UniFluid.image_tokens),
                                            method=UniFluid.decode_tokens))


def vae_roundtrip(model: UniFluid, params, images_uint8: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 images -> the frozen VAE's reconstructions (posterior mean), uint8."""
    fn = _roundtrip_fn(model)
    out = [generate.to_uint8(fn(params, chunk.astype(np.float32) / 127.5 - 1.0))
           for chunk in _batched(images_uint8, batch_size)]
    return np.concatenate(out)


def answer(model: UniFluid, params, tokenizer, images: np.ndarray, questions: Sequence[str] | None, task: str,
           batch_size: int, caption_prompt: str) -> list[str]:
    out = []
    for i in range(0, len(images), batch_size):
        imgs = images[i:i + batch_size]
        qs = None if questions is None else list(questions[i:i + batch_size])
        n = len(imgs)
        if n < batch_size:  # pad to one compiled shape
            imgs = np.concatenate([imgs, np.repeat(imgs[-1:], batch_size - n, 0)])
            qs = None if qs is None else qs + [qs[-1]] * (batch_size - n)
        batch = decode.question_batch(model.config, imgs, qs, task=task, tokenizer=tokenizer,
                                      caption_prompt=caption_prompt)
        res = decode.decode_text(model, params, batch)
        out.extend(decode.detokenize(tokenizer, res["tokens"])[:n])
    return out


def save_grid(path: str, images: np.ndarray, cols: int = 8, captions: Sequence[str] | None = None,
              scale: int = 2) -> None:
    """A PNG grid; with `captions`, each image is upscaled `scale`x (nearest) and its caption is written
    under it, wrapped to the cell width."""
    n, h, w, _ = images.shape
    if captions is None:
        rows = -(-n // cols)
        grid = np.zeros((rows * h, cols * w, 3), np.uint8)
        for i, im in enumerate(images):
            r, c = divmod(i, cols)
            grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
        Image.fromarray(grid).save(path)
        return
    font = ImageFont.load_default(size=10)
    cw, ih = w * scale + 8, h * scale
    lines = [_wrap(t, font, cw - 4) for t in captions]
    th = 12 * max(len(x) for x in lines) + 4
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * cw, rows * (ih + th)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        x, y = c * cw + 4, r * (ih + th)
        canvas.paste(Image.fromarray(im).resize((w * scale, ih), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(lines[i]):
            draw.text((x, y + ih + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    canvas.save(path)


def _wrap(text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        cand = f"{cur} {word}".strip()
        if cur and font.getlength(cand) > width:
            lines.append(cur)
            cur = word
        else:
            cur = cand
    return lines + [cur] if cur else lines


def evaluate(model: UniFluid, params, data_dir: str, *, out_dir: str | None = None, split: str = "test",
             num_geneval: int = 48, num_caption: int = 64, num_vqa: int = 64, batch_size: int = 16,
             num_steps: int = 100, cfg_scale: float = 3.0, temperature: float = 1.0,
             cfg_schedule: str = "linear", caption_prompt: str = "caption en", seed: int = 0) -> dict:
    """All evaluators on one model; writes eval_results.json and samples.png (+ prompts) to `out_dir`."""
    c = model.config
    tok = Tokenizer(os.path.join(data_dir, "tokenizer.model"))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    rng = jax.random.key(seed)
    results: dict = {}

    if num_geneval:
        pairs = geneval_prompts(data_dir, num_geneval)
        imgs = generate_for_prompts(model, params, tok, [p for p, _ in pairs], rng, batch_size=batch_size,
                                    num_steps=num_steps, cfg_scale=cfg_scale, temperature=temperature,
                                    cfg_schedule=cfg_schedule)
        g = geneval.score_images(imgs, [s for _, s in pairs])
        results["geneval"] = {k: v for k, v in g.items() if k not in ("detections", "correct")}
        results["geneval_chance"] = chance.geneval_chance([s for _, s in pairs], g["detections"])
        real = [pipeline.load_image(r["image"], c.vae.image_size) for r in _records(data_dir, split, "t2i", 256)]
        real = ((np.stack(real) + 1.0) * 127.5).round().astype(np.uint8)
        results["fd_shapes_features"] = fid.compute_fd(fid.shapes_features, imgs, real)
        rs = np.random.default_rng(seed)
        drawn = np.stack([shapes.render(shapes.scene_for_spec(spec, rs, size=c.vae.image_size)) for _, spec in pairs])
        ceiling = geneval.score_images(vae_roundtrip(model, params, drawn), [s for _, s in pairs])
        results["geneval_vae_ceiling"] = {k: v for k, v in ceiling.items() if k not in ("detections", "correct")}
        if out_dir:
            marks = [f"{p} [{'ok' if ok else 'miss'}]" for (p, _), ok in zip(pairs[:32], g["correct"])]
            save_grid(os.path.join(out_dir, "samples.png"), imgs[:32], captions=marks)
            with open(os.path.join(out_dir, "samples.txt"), "w") as f:
                f.write("\n".join(f"{i}: {p} -> {'ok' if ok else 'miss'}"
                                  for i, ((p, _), ok) in enumerate(zip(pairs[:32], g["correct"]))) + "\n")

    if c.n_und and num_caption:
        recs = _records(data_dir, split, "caption", num_caption)
        imgs = np.stack([pipeline.load_image(r["image"], c.siglip.image_size, "bilinear") for r in recs])
        preds = answer(model, params, tok, imgs, None, "caption", batch_size, caption_prompt)
        refs = [r["caption"] for r in recs]
        results["caption"] = {"cider": cider.cider_d(refs, preds)[0],
                              "exact_match": cider.caption_exact_match(preds, refs),
                              "chance": chance.caption_chance(preds, refs),
                              "examples": [{"pred": p, "ref": r} for p, r in zip(preds[:5], refs[:5])]}

    if c.n_und and num_vqa:
        recs = _records(data_dir, split, "vqa", num_vqa)
        imgs = np.stack([pipeline.load_image(r["image"], c.siglip.image_size, "bilinear") for r in recs])
        preds = answer(model, params, tok, imgs, [r["question"] for r in recs], "vqa", batch_size, caption_prompt)
        answers = [[r["answer"]] for r in recs]
        acc = vqa.vqa_accuracy(preds, answers, [r.get("qtype", "all") for r in recs])
        results["vqa"] = {k: v for k, v in acc.items() if not isinstance(v, (list, dict))}
        results["vqa"]["chance"] = chance.vqa_chance(preds, [r["answer"] for r in recs],
                                                     [r.get("qtype", "all") for r in recs])
        results["vqa"]["examples"] = [{"q": r["question"], "pred": p, "ref": r["answer"]}
                                      for r, p in zip(recs[:5], preds[:5])]

    if out_dir:
        with open(os.path.join(out_dir, "eval_results.json"), "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


def evaluate_section(model: UniFluid, params, section, *, out_dir: str | None, caption_prompt: str) -> dict:
    """`evaluate` with the settings of a config's `eval` section (--mode=eval and the trainer's eval hook)."""
    e = section  # the eval section's keys, forwarded one to one
    return evaluate(model, params, e.data_dir, out_dir=out_dir, split=e.split, num_geneval=e.num_geneval,
                    num_caption=e.num_caption, num_vqa=e.num_vqa, batch_size=e.batch_size, num_steps=e.num_steps,
                    cfg_scale=e.cfg_scale, cfg_schedule=e.get("cfg_schedule", "linear"), temperature=e.temperature,
                    caption_prompt=caption_prompt)
