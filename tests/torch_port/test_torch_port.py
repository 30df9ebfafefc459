"""PyTorch port vs the JAX model on a random tiny UniFluid exported to a folder: text logits and captions
(greedy, beam), the diffusion head and one sampler step, text-to-image with the same injected noise."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.train import runner  # noqa: E402
from unifluid_jax.convert import unifluid as conv  # noqa: E402
from unifluid_jax.data import tokenizer as tok_lib  # noqa: E402
from unifluid_jax.inference import decode, generate  # noqa: E402
from unifluid_jax.models import diffusion as diff_lib  # noqa: E402
from unifluid_jax.models import unifluid  # noqa: E402
from unifluid_jax.models.gaussian_diffusion import create_diffusion  # noqa: E402
from unifluid_jax.tasks.unifluid import UniFluidTask  # noqa: E402
from unifluid_jax.train import sharding  # noqa: E402

pytestmark = pytest.mark.xdist_group("torch_port")
_TEXTS = ["a red circle", "two blue squares", "a green triangle left of a yellow cross", "how many shapes",
          "what colour is the circle", "caption en", "one", "two", "three", "red", "blue", "green"] * 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("port")
    tok_path = tok_lib.train_tokenizer(_TEXTS, str(tmp / "tok"), vocab_size=120)
    cfg = runner.load_config("configs/unifluid_tiny.py", "data=/nonexistent")
    task = UniFluidTask(cfg)
    # Random everywhere (no init compile; the head's output layers are zero at init, norms 0 / 1).
    abstract = sharding.unbox_abstract(jax.eval_shape(task.init_params, jax.random.key(0)))
    gen = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.05 * gen.standard_normal(a.shape)).astype(np.float32), abstract)
    out = str(tmp / "export")
    conv.export_params(params, task.model_config, out, model_section=cfg.model, tokenizer=tok_path,
                       extra={"caption_prompt": "caption en"})
    from unifluid_jax.torch_port import UniFluidTorch
    return dict(model=task.model, variables={"params": jax.tree.map(jnp.asarray, params)}, folder=out,
                port=UniFluidTorch.from_folder(out), tok=tok_lib.Tokenizer(tok_path), params=params)


def _und_images(b, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_text_logits_and_greedy_captions_match_jax(setup):
    m, port, tok = setup["model"], setup["port"], setup["tok"]
    images = _und_images(3)
    questions = ["what colour is the circle", "how many shapes", "red"]  # different lengths: padded rows
    batch = decode.question_batch(m.config, images, questions, task="vqa", tokenizer=tok)
    want = decode.decode_text(m, setup["variables"], batch, method="greedy", max_new_tokens=6, return_logits=True)
    texts, got = port.answer(_nchw(images), questions, max_new_tokens=6, return_tokens=True)
    np.testing.assert_array_equal(got["tokens"].numpy(), want["tokens"])
    steps = int(want["length"].max())
    np.testing.assert_allclose(got["logits"][:, :steps].numpy(), want["logits"][:, :steps], atol=1e-4, rtol=0)
    assert texts == decode.detokenize(tok, want["tokens"])
    caps = decode.question_batch(m.config, images, None, task="caption", tokenizer=tok)
    want = decode.decode_text(m, setup["variables"], caps, method="greedy", max_new_tokens=6)
    assert port.caption(_nchw(images), max_new_tokens=6) == decode.detokenize(tok, want["tokens"])


def test_beam_search_matches_jax(setup):
    m, port, tok = setup["model"], setup["port"], setup["tok"]
    images = _und_images(2, seed=1)
    batch = decode.question_batch(m.config, images, None, task="caption", tokenizer=tok)
    want = decode.decode_text(m, setup["variables"], batch, method="beam", beam_size=3, max_new_tokens=5)
    texts, got = port.caption(_nchw(images), method="beam", beam_size=3, max_new_tokens=5, return_tokens=True)
    np.testing.assert_array_equal(got["beams"].numpy(), want["beams"])
    np.testing.assert_allclose(got["score"].numpy(), want["score"], atol=1e-4, rtol=0)
    assert texts == decode.detokenize(tok, want["tokens"])


def test_diffusion_head_and_sampler_step_match_jax(setup):
    m, port = setup["model"], setup["port"]
    c = m.config
    rng = np.random.default_rng(0)
    n = 12
    x = rng.normal(size=(n, c.token_dim)).astype(np.float32)
    z = rng.normal(size=(n, c.width)).astype(np.float32)
    t = rng.integers(0, 1000, n).astype(np.int32)
    head = diff_lib.DiffusionHead(c.diffusion)
    want = np.asarray(head.apply({"params": setup["params"]["head"]}, x, t, z))
    got = port.head(torch.from_numpy(x), torch.from_numpy(t).long(), torch.from_numpy(z)).detach().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    from unifluid_jax.torch_port import diffusion as port_diff
    noise = rng.normal(size=(n, c.token_dim)).astype(np.float32)
    for steps, j, clip in ((100, 57, None), (10, 9, 5.0), (10, 0, None)):
        jd = create_diffusion(steps)
        want_x = np.asarray(jd.p_sample(jnp.asarray(want), jnp.asarray(x), jnp.full((n,), j), jnp.asarray(noise),
                                        0.9, clip))
        sched = port_diff.Schedule(steps)
        np.testing.assert_array_equal(sched.timestep_map.numpy(), jd.timestep_map)
        got_x = sched.p_sample(torch.from_numpy(want), torch.from_numpy(x), j, torch.from_numpy(noise), 0.9, clip)
        np.testing.assert_allclose(got_x.numpy(), want_x, atol=1e-5, rtol=1e-6)


def _jax_noise(rng, b, c, num_steps, n):
    """The (x_T, step noise) generate_images draws for every AR step, from its public pieces."""
    _, k_sample = jax.random.split(rng)
    draws = [diff_lib.sampling_noise(jax.random.fold_in(k_sample, k), num_steps, b, c) for k in range(n)]
    return np.stack([np.asarray(d[0]) for d in draws]), np.stack([np.asarray(d[1]) for d in draws])


@pytest.mark.slow
@pytest.mark.parametrize("order,cfg", [("raster", 1.0), ("random", 2.5)])
def test_text_to_image_matches_jax(setup, order, cfg):
    m, port, tok = setup["model"], setup["port"], setup["tok"]
    c = m.config
    prompts = ["a red circle", "two blue squares left of a green triangle"]
    rng = jax.random.key(3)
    images, tokens, aux = generate.generate_images(m, setup["variables"], prompts, rng, num_steps=10, cfg_scale=cfg,
                                                   order=order, temperature=0.8, tokenizer=tok, return_aux=True,
                                                   decode_chunk=0)
    noise = _jax_noise(rng, len(prompts), c.token_dim, 10, c.n_img)
    got_img, got_tok = port.generate(prompts, num_steps=10, cfg_scale=cfg, order=torch.from_numpy(
        np.asarray(aux["order"])).long(), temperature=0.8, noise=noise)
    np.testing.assert_allclose(got_tok.numpy(), np.asarray(tokens), atol=1e-3, rtol=0)
    np.testing.assert_allclose(got_img.numpy().transpose(0, 2, 3, 1), np.asarray(images), atol=1e-3, rtol=0)


_FRESH = """
import sys
from unifluid_jax.torch_port import UniFluidTorch
m = UniFluidTorch.from_folder(sys.argv[1])
imgs, toks = m.generate(["a red circle"], num_steps=4, order="random", seed=0)
print(m.caption(imgs[:, :, :32, :32], max_new_tokens=3), tuple(imgs.shape), "jax" in sys.modules)
"""


def test_port_runs_in_a_fresh_offline_process_without_jax(setup):
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(runner.ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _FRESH, setup["folder"]], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("(1, 3, 64, 64) False"), out.stdout
