"""Offline latent cache: run the frozen VAE once over the generation images, store the latent tokens in records.

    python -m unifluid_jax.tools.extract_latents --src='DIR/train/t2i' --out=CACHE/train/t2i \
        --vae_preset=tiny_f4 --vae_params=vae_params.msgpack --patch_size=2 --gen_size=64

Each t2i / edit record is copied with extra fields (npy bytes, loaded with allow_pickle=False):
    gen_latent   [2, n, C] float16: (mean, std) of the scaled, patchified posterior of the generation image
                 (t2i: `image`; edit: `image2`, the target)
    src_latent   [2, n, C] float16: the same for an edit's source image (`image`)
Other records are copied unchanged. With `config.data.latents = 'sample'` (or 'mean') the pipeline emits
`gen_tokens` / `src_tokens` [B, n, C] (mean + std * noise, noise seeded per example index, so resumption stays
exact) instead of decoding `image_gen` / `image_src`; the model uses them in place of VAE.encode. Because the
VAE is linear in the scaling factor and patchify is a permutation, scaled mean/std tokens sample the same
distribution as `vae.encode_latents` + `patchify` inside the step.

`--vae_params` is a flax msgpack file (`flax.serialization.msgpack_serialize(params)`) of the VAE's params
(with or without a top-level 'params' key).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from unifluid_jax import fs
from unifluid_jax.data import images, records
from unifluid_jax.data.pipeline import load_image
from unifluid_jax.data.records import from_npy, to_npy  # noqa: F401 (re-exported for users of the cache)

EncodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images [B,G,G,3] -> (mean, std) [B,n,C]


def vae_encode_fn(vae_cfg, variables, patch_size: int) -> EncodeFn:
    """EncodeFn from the repo's KL-VAE: scaled, patchified posterior mean and std tokens."""
    import jax
    import jax.numpy as jnp

    from unifluid_jax.models import vae as vae_lib
    from unifluid_jax.models.patchify import patchify

    model = vae_lib.AutoencoderKL(vae_cfg)
    if "params" not in variables:
        variables = {"params": variables}

    @jax.jit
    def enc(x):
        mean, logvar = model.apply(variables, x, method=model.encode)
        s = vae_cfg.scaling_factor
        return patchify(mean * s, patch_size), patchify(jnp.exp(0.5 * logvar) * s, patch_size)

    def fn(images):
        m, sd = enc(jnp.asarray(images))
        return np.asarray(m), np.asarray(sd)
    return fn


def _jobs(rec: dict) -> list[tuple[str, bytes]]:
    """(field to add, encoded image) pairs for one record."""
    task = rec.get("task")
    if task == "t2i" and "image" in rec:
        return [("gen_latent", rec["image"])]
    if task == "edit" and "image" in rec and "image2" in rec:
        return [("gen_latent", rec["image2"]), ("src_latent", rec["image"])]
    return []


def extract(recs: Iterable[dict], out_prefix: str, encode_fn: EncodeFn, gen_size: int, batch_size: int = 32,
            num_shards: int = 1, resize: str = "bicubic", dtype=np.float16) -> dict[str, int]:
    """Writes `recs` with latent fields added; returns counts {written, encoded, skipped, 'skipped:REASON'}.
    Records whose images break the rules of data/images.py (undecodable, truncated, decompression bombs) are
    dropped, counted by reason and logged (rate-limited, with the record id), so one bad image never stops
    the run."""
    stats = {"written": 0, "encoded": 0, "skipped": 0}
    skip_log = records.SkipLog("extract_latents")
    with records.RecordWriter(out_prefix, num_shards) as w:
        pending: list[tuple[dict, list[tuple[str, np.ndarray]]]] = []

        def flush():
            imgs = [img for _, jobs in pending for _, img in jobs]
            if imgs:
                outs = []
                for i in range(0, len(imgs), batch_size):
                    chunk = np.stack(imgs[i:i + batch_size])
                    n = len(chunk)
                    if n < batch_size:  # one compiled shape
                        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
                    m, s = encode_fn(chunk)
                    outs += [np.stack([m[j], s[j]]).astype(dtype) for j in range(n)]
                k = 0
                for rec, jobs in pending:
                    for field, _ in jobs:
                        rec[field] = to_npy(outs[k])
                        k += 1
                stats["encoded"] += len(outs)
            for rec, _ in pending:
                w.write(rec)
                stats["written"] += 1
            pending.clear()

        for rec in recs:
            rec = dict(rec)
            try:
                jobs = [(f, load_image(b, gen_size, resize)) for f, b in _jobs(rec)]
            except images.ImageError as e:
                stats["skipped"] += 1
                stats[f"skipped:{e.reason}"] = stats.get(f"skipped:{e.reason}", 0) + 1
                skip_log.log(e.reason, rec.get("id"), str(e))
                continue
            pending.append((rec, jobs))
            if sum(len(j) for _, j in pending) >= batch_size:
                flush()
        flush()
    return stats


def main(argv: Sequence[str]) -> None:
    del argv
    import flax.serialization
    from absl import flags

    from unifluid_jax.models import vae as vae_lib
    F = flags.FLAGS
    variables = flax.serialization.msgpack_restore(fs.read_bytes(F.vae_params))
    cfg = vae_lib.get_config(F.vae_preset, image_size=F.gen_size)
    stats = extract(records.read_records(F.src), F.out, vae_encode_fn(cfg, variables, F.patch_size), F.gen_size,
                    F.batch_size, F.num_shards)
    print(stats)


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("src", None, "input records (glob / shard prefix / dir)", required=True)
    flags.DEFINE_string("out", None, "output shard prefix", required=True)
    flags.DEFINE_string("vae_preset", "sd_kl_f8", "VAE preset (models/vae.py)")
    flags.DEFINE_string("vae_params", None, "flax msgpack file of the VAE params", required=True)
    flags.DEFINE_integer("patch_size", 2, "latent patch size (model.patch_size)")
    flags.DEFINE_integer("gen_size", 256, "generation image size (data.gen_size)")
    flags.DEFINE_integer("batch_size", 32, "encoder batch")
    flags.DEFINE_integer("num_shards", 1, "output shards")
    app.run(main)
