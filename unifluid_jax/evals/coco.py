"""`--mode=fid_eval`: a COCO-30k-style protocol in one command: prompts file -> images on disk -> FID (and IS,
CLIP score) against reference statistics; data-parallel over the local devices and over processes, resumable.

    python -m unifluid_jax.main --config=configs/X.py --workdir=RUN --mode=fid_eval \\
        --config.infer.prompts=coco30k_captions.txt --config.fid_eval.inception=pt_inception-2015-12-05-6726825d.pth \\
        --config.fid_eval.ref_stats=coco_val2014_30k.npz [--config.fid_eval.clip=clip-vit-large-patch14/]

Settings: `config.infer` (prompts, out, batch_size, seed, sampling) and `config.fid_eval` (`SETTINGS` below;
a config without that section gets the defaults). Work unit = one batch of `infer.batch_size` prompts with
rng fold_in(key(seed), batch index): process p of P takes batches b with b % P == p and shards each batch
over its local devices ('data' axis of a local mesh), so the images depend only on (seed, batch size), not
on the device or process count. A batch is finished when its feature file exists (written after its PNGs,
by an atomic rename); a restarted run skips finished batches, so a killed run continues where it stopped
and ends with the same numbers. After a barrier, process 0 reads every batch's features in batch order
(the processes' results meet on the shared output directory) and computes the metrics.

Outputs in `infer.out` (default RUN/fid_eval): images/NNNNNN.png (prompt line order), features/BBBBBB.npz,
gen_stats.npz (pytorch-fid / clean-fid layout), results.json.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unifluid_jax import fs
from unifluid_jax.config import ConfigError
from unifluid_jax.evals import fid as fid_lib
from unifluid_jax.evals import inception as inception_lib

log = logging.getLogger(__name__)

# config.fid_eval keys and defaults. inception: pytorch-fid's pt_inception-2015-12-05-*.pth; ref_stats: an .npz
# (pytorch-fid / clean-fid: mu, sigma) or a folder of reference images; mode: Inception preprocessing
# (evals/inception.py MODES); clip: a transformers CLIPModel folder ('' = no CLIP score); splits: IS splits;
# inception_size: 299 except in tests.
MANIFEST = "fid_eval_settings.json"
SETTINGS = dict(inception="", ref_stats="", mode="clean", clip="", splits=10, inception_size=inception_lib.SIZE)


def settings(config) -> dict:
    s = dict(SETTINGS)
    s.update(dict(config.get("fid_eval", {})))
    return s


def _check(config, s: dict, prompts: list[str]) -> None:
    """Every input error before the model loads or anything compiles."""
    if s["mode"] not in inception_lib.MODES:
        raise ConfigError(f"config.fid_eval.mode={s['mode']!r} is unknown; choose one of {inception_lib.MODES}")
    if not s["inception"]:
        raise ConfigError("config.fid_eval.inception is empty: give the path of pytorch-fid's "
                          "pt_inception-2015-12-05-6726825d.pth")
    if not s["ref_stats"]:
        raise ConfigError("config.fid_eval.ref_stats is empty: give a pytorch-fid / clean-fid .npz or a folder "
                          "of reference images")
    if fs.isdir(s["ref_stats"]):
        fid_lib.image_files(s["ref_stats"])
    else:
        try:
            mu, _ = fid_lib.load_stats(s["ref_stats"])
        except (OSError, ValueError) as e:
            raise ConfigError(f"config.fid_eval.ref_stats: {e}") from e
        if mu.shape[0] != inception_lib.FEATURE_DIM:
            raise ConfigError(f"config.fid_eval.ref_stats={s['ref_stats']} has feature dim {mu.shape[0]}, but FID "
                              f"uses Inception pool3 features ({inception_lib.FEATURE_DIM}); give stats of pool3")
    bs, n_local = int(config.infer.batch_size), jax.local_device_count()
    if bs % n_local:
        raise ConfigError(f"config.infer.batch_size={bs} must be a multiple of the {n_local} local devices "
                          "(each batch is split over them)")
    if len(prompts) < int(s["splits"]):
        raise ConfigError(f"{len(prompts)} prompts for fid_eval.splits={s['splits']} Inception-Score splits")


def _load_networks(s: dict, put):
    from unifluid_jax.convert import inception as inception_convert
    try:
        params = inception_convert.load(s["inception"])
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from e
    ext = inception_lib.Extractor(params, mode=s["mode"], size=int(s["inception_size"]), put=put)
    clip = None
    if s["clip"]:
        from unifluid_jax.convert import clip as clip_convert
        from unifluid_jax.evals import clip_score
        try:
            clip = clip_score.Scorer(*clip_convert.load(s["clip"]))
        except (OSError, ValueError) as e:
            raise ConfigError(f"config.fid_eval.clip: {e}") from e
    return ext, clip


def _local_mesh() -> Mesh:
    """This process's devices only: generation and encoding need no cross-process collective."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def _row_sharder():
    """Places an array with its rows split over the local devices (replicated if they do not divide)."""
    mesh = _local_mesh()
    rows, repl = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    n = jax.local_device_count()
    return lambda x: jax.device_put(x, rows if np.ndim(x) and np.shape(x)[0] % n == 0 else repl)


def _save_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name, then rename: a killed run never leaves a half-written file under `path`."""
    tmp = f"{path}.tmp{jax.process_index()}"
    fs.write_bytes(tmp, data)
    fs.path(tmp).rename(path)


def _png(image_u8: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG")
    return buf.getvalue()


class Progress:
    """One log line per batch: done / total images of this process's share, rate, ETA."""

    def __init__(self, total: int, done: int):
        self.total, self.done, self.start, self.new = total, done, time.time(), 0

    def update(self, n: int) -> str:
        self.done, self.new = self.done + n, self.new + n
        rate = self.new / max(time.time() - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_s = f"{int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}" if math.isfinite(eta) else "?"
        line = (f"fid_eval process {jax.process_index()}: {self.done}/{self.total} images, {rate:.2f} img/s, "
                f"ETA {eta_s}")
        log.info(line)
        return line


def generate_and_encode(config, model, variables, tok, prompts: list[str], out: str, ext, clip) -> None:
    """This process's share of the batches: generate, write PNGs, encode, write the batch's features."""
    from unifluid_jax.inference import generate
    inf, bs = config.infer, int(config.infer.batch_size)
    put_rows = _row_sharder()
    variables = jax.device_put(variables, NamedSharding(_local_mesh(), PartitionSpec()))
    n_batches = math.ceil(len(prompts) / bs)
    mine = [b for b in range(n_batches) if b % jax.process_count() == jax.process_index()]
    done = [b for b in mine if fs.exists(_features_path(out, b))]
    count = lambda bb: sum(min(bs, len(prompts) - b * bs) for b in bb)  # noqa: E731
    progress = Progress(count(mine), count(done))
    if done:
        log.info("fid_eval: %d of this process's %d batches already on disk; resuming", len(done), len(mine))
    for b in mine:
        if b in done:
            continue
        real = prompts[b * bs:(b + 1) * bs]
        padded = real + [real[-1]] * (bs - len(real))  # one shape for every batch; extra rows are dropped
        batch = generate.prompt_batch(model.config, padded, tokenizer=tok)
        batch = {k: put_rows(v) for k, v in batch.items()}
        images, _ = generate.generate_images(
            model, variables, batch, jax.random.fold_in(jax.random.key(int(inf.seed)), b),
            num_steps=int(inf.num_steps), cfg_scale=float(inf.cfg_scale), cfg_schedule=inf.cfg_schedule,
            temperature=float(inf.temperature), order=inf.order)
        images = generate.to_uint8(images)
        for i, im in enumerate(images[:len(real)]):
            _save_atomic(fs.join(out, "images", f"{b * bs + i:06d}.png"), _png(im))
        feats = ext(images)  # the quantised images, as a reader of the PNGs would see them
        arrays = {"pool3": feats["pool3"][:len(real)], "logits_unbiased": feats["logits_unbiased"][:len(real)]}
        if clip is not None:
            arrays["clip_cos"] = clip.cosines(images[:len(real)], real)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        _save_atomic(_features_path(out, b), buf.getvalue())
        progress.update(len(real))


def _manifest(config, s: dict, prompts: list[str]) -> dict:
    """The settings that decide the images and features, kept in the output directory: a resumed run must
    have the same ones (another batch size or seed would mix two protocols in one set of files)."""
    inf = config.infer
    return {"prompts": len(prompts), "first_prompt": prompts[0], "last_prompt": prompts[-1],
            "batch_size": int(inf.batch_size), "seed": int(inf.seed), "num_steps": int(inf.num_steps),
            "cfg_scale": float(inf.cfg_scale), "cfg_schedule": inf.cfg_schedule,
            "temperature": float(inf.temperature), "order": inf.order, "step": int(inf.step),
            "inception_mode": s["mode"], "inception_size": int(s["inception_size"]), "clip": s["clip"]}


def check_manifest(want: dict, out: str) -> None:
    path = fs.join(out, MANIFEST)
    if not fs.exists(path):
        return
    have = json.loads(fs.read_text(path))
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    if diff:
        what = "; ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in diff)
        raise ConfigError(f"{out} holds an fid_eval run with other settings ({what}); set config.infer.out "
                          "to a new directory")


def _features_path(out: str, b: int) -> str:
    return fs.join(out, "features", f"{b:06d}.npz")


def metrics(out: str, n_prompts: int, batch_size: int, s: dict, ext) -> dict:
    """Process 0: FID / IS / CLIP score from every batch's features (in batch order)."""
    stats, logits, cos = fid_lib.FeatureStats(), [], []
    for b in range(math.ceil(n_prompts / batch_size)):
        path = _features_path(out, b)
        if not fs.exists(path):
            raise RuntimeError(f"fid_eval: {path} is missing after all processes finished; re-run to resume")
        with fs.open(path, "rb") as f:
            d = np.load(io.BytesIO(f.read()))
            stats.update(d["pool3"])
            logits.append(d["logits_unbiased"])
            if "clip_cos" in d.files:
                cos.append(d["clip_cos"])
    fid_lib.save_stats(fs.join(out, "gen_stats.npz"), stats)
    if fs.isdir(s["ref_stats"]):
        ref = fid_lib.folder_stats(ext.pool3, s["ref_stats"])
        ref_mu, ref_sigma = ref.mean(), ref.cov()
    else:
        ref_mu, ref_sigma = fid_lib.load_stats(s["ref_stats"])
    is_mean, is_std = fid_lib.inception_score(np.concatenate(logits), splits=int(s["splits"]))
    res = {"num_images": stats.n, "fid": fid_lib.fid_against(stats, ref_mu, ref_sigma, what=s["ref_stats"]),
           "inception_score": is_mean, "inception_score_std": is_std, "inception_mode": s["mode"],
           "inception_size": int(s["inception_size"])}
    if cos:
        from unifluid_jax.evals import clip_score
        res["clip_score"] = clip_score.score_from_cosines(np.concatenate(cos))
        res["clip_checkpoint"] = s["clip"]
    return res


def run(config, workdir: str) -> dict:
    """The --mode=fid_eval entry (see module doc). Returns the metrics on process 0, {} on the others."""
    from unifluid_jax.inference import cli
    from unifluid_jax.train.trainer import sync_processes
    s = settings(config)
    prompts = cli._lines(config.infer.prompts, "prompts")
    tok = cli._tokenizer(config)
    cli._check_prompts(cli.unifluid.config_from_dict(config.model), prompts, tok)
    _check(config, s, prompts)
    out = config.infer.out or fs.join(workdir, "fid_eval")
    manifest = _manifest(config, s, prompts)
    check_manifest(manifest, out)
    ext, clip = _load_networks(s, _row_sharder())
    model, variables = cli.load_model(config, workdir)
    for sub in ("images", "features"):
        fs.makedirs(fs.join(out, sub))
    if not fs.exists(fs.join(out, MANIFEST)):
        _save_atomic(fs.join(out, MANIFEST), json.dumps(manifest, indent=1).encode())
    bs = int(config.infer.batch_size)
    generate_and_encode(config, model, variables, tok, prompts, out, ext, clip)
    sync_processes("fid_eval_generated")
    if jax.process_index() != 0:
        return {}
    res = metrics(out, len(prompts), bs, s, ext)
    fs.write_text(fs.join(out, "results.json"), json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return res
