"""Offline latent cache (tools/extract_latents.py) and the pipeline's latents mode."""
import numpy as np
import pytest
from absl import flags

from unifluid_jax.data import layout as L
from unifluid_jax.data import pipeline as P
from unifluid_jax.data import records as R
from unifluid_jax.tools import build_shapes, extract_latents as X

N_TOK, DIM, G = 16, 12, 32  # fake latent: 32 px image -> 4x4 blocks of 8x8 px -> 16 tokens of 12 dims


def fake_encode(images):
    """Deterministic stand-in for the VAE: mean = 8x8-block means per channel, tiled; std = 0.5."""
    b = images.shape[0]
    blocks = images.reshape(b, 4, 8, 4, 8, 3).mean(axis=(2, 4)).reshape(b, N_TOK, 3)
    mean = np.tile(blocks, (1, 1, DIM // 3))
    return mean, np.full_like(mean, 0.5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("latents")
    build_shapes.build(str(d / "shapes"), size=G, num_train=40, num_val=2, num_test=2, num_shards=1, num_geneval=1)
    stats = {}
    for t in L.TASKS:
        stats[t] = X.extract(R.read_records(str(d / "shapes" / "train" / t)), str(d / "cache" / t), fake_encode,
                             gen_size=G, batch_size=8)
    return d, stats


def _cfg(d, latents, **kw):
    c = P.default_config()
    c.sources = [{"path": str(d / "cache" / t), "kind": "array_record", "weight": 1.0, "task": ""} for t in L.TASKS]
    c.gen_size, c.und_size, c.max_text_len, c.per_host_batch_size = G, G, 48, 8
    c.tokenizer, c.read_threads = str(d / "shapes" / "tokenizer.model"), 1
    c.latents, c.latent_tokens, c.latent_dim = latents, N_TOK, DIM
    for k, v in kw.items():
        c[k] = v
    return c


def test_extract_adds_latents(cache):
    d, stats = cache
    assert stats["t2i"] == {"written": 40, "encoded": 40, "skipped": 0}
    assert stats["edit"]["encoded"] == 80 and stats["caption"]["encoded"] == 0
    for r in R.read_records(str(d / "cache" / "edit")):
        ms = R.from_npy(r["gen_latent"])
        assert ms.shape == (2, N_TOK, DIM) and ms.dtype == np.float16
        want = fake_encode(P.load_image(r["image2"], G)[None])[0][0]
        np.testing.assert_allclose(ms[0], want, atol=2e-3)
        np.testing.assert_allclose(R.from_npy(r["src_latent"])[0], fake_encode(P.load_image(r["image"], G)[None])[0][0],
                                   atol=2e-3)


def test_pipeline_latents_mean_and_sample(cache):
    d, _ = cache
    flags.FLAGS.mark_as_parsed()
    cfg = _cfg(d, "mean", edit_source=("siglip", "vae"))
    b = next(P.make_iterator(cfg, shard_index=0, shard_count=1))
    assert "image_gen" not in b and "image_src" not in b
    assert b["gen_tokens"].shape == (8, N_TOK, DIM) and b["src_tokens"].shape == (8, N_TOK, DIM)
    for i, t in enumerate(b["task"]):
        gen_nz = np.abs(b["gen_tokens"][i]).max() > 0
        assert gen_nz == (t in L.GEN_TASKS)
        assert (np.abs(b["src_tokens"][i]).max() > 0) == (t == L.EDIT)
        assert (np.abs(b["image_und"][i]).max() > 0) == (t != L.T2I)
    # sample: mean + 0.5 * noise, deterministic per example index, exact on resume
    cs = _cfg(d, "sample")
    it = P.make_iterator(cs, shard_index=0, shard_count=1)
    s0 = next(it)
    state = it.get_state()
    s1 = next(it)
    it2 = P.make_iterator(cs, shard_index=0, shard_count=1)
    np.testing.assert_array_equal(next(it2)["gen_tokens"], s0["gen_tokens"])
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["gen_tokens"], s1["gen_tokens"])
    np.testing.assert_array_equal(s0["task"], b["task"])  # same order: the rng does not affect shuffling
    gen = np.isin(s0["task"], L.GEN_TASKS)
    assert gen.any()
    diff = s0["gen_tokens"][gen] - b["gen_tokens"][gen]
    assert 0.4 < diff.std() < 0.6 and abs(diff.mean()) < 0.1  # std-0.5 noise on top of the same means


def test_bad_latents_are_skipped(cache, tmp_path):
    d, _ = cache
    recs = list(R.read_records(str(d / "cache" / "t2i")))[:6]
    recs[1]["gen_latent"] = R.to_npy(np.zeros((2, N_TOK + 1, DIM), np.float16))  # wrong shape
    recs[2]["gen_latent"] = b"\x93NUMPY garbage"
    del recs[3]["gen_latent"]
    R.write_records(recs, str(tmp_path / "bad"))
    cfg = _cfg(d, "mean", num_epochs=1, per_host_batch_size=2)
    cfg.sources = [{"path": str(tmp_path / "bad"), "kind": "array_record", "weight": 1.0, "task": ""}]
    got = list(P.make_iterator(cfg, shard_index=0, shard_count=1))
    skipped = dict(zip(P.SKIP_REASONS, sum(g["num_skipped"] for g in got).tolist()))
    assert skipped["bad_latent"] == 2 and skipped["missing_field"] == 1
    assert sum(int(g["valid"].sum()) for g in got) == 3


def test_vae_encode_fn_shapes():
    jax = pytest.importorskip("jax")
    from unifluid_jax.models import vae as vae_lib
    cfg = vae_lib.get_config("tiny_f4", image_size=32, base_channels=8, norm_groups=4, mid_attention=False)
    model = vae_lib.AutoencoderKL(cfg)
    x = np.zeros((2, 32, 32, 3), np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, method=model.encode))  # no compile
    variables = jax.tree.map(lambda a: np.full(a.shape, 0.01, a.dtype), shapes)
    m, s = X.vae_encode_fn(cfg, variables, 2)(x)
    assert m.shape == s.shape == (2, (32 // 4 // 2) ** 2, cfg.latent_channels * 4) and (s > 0).all()
