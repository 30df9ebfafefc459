"""Fixed vs packed rows: the same examples give the same per-example losses and gradients; the text NLL
checked against an independent next-token computation (issue 16 item 14)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unifluid_jax import layout
from unifluid_jax.models import unifluid
from unifluid_jax.train import sharding

from tests.models.unifluid_fixtures import examples, make_batch, tiny_config

pytestmark = pytest.mark.xdist_group("models_unifluid")

U = unifluid.UniFluid
TASKS = ("t2i", "caption", "vqa", "edit", "t2i", "caption", "edit", "vqa")
UIDS = [1000 + 7 * i for i in range(len(TASKS) + 2)]


@pytest.fixture(scope="module")
def case():
    # Both edit sources (SigLIP und slots and VAE src slots), sampled latents, random orders.
    cfg = tiny_config(edit_source=("siglip", "vae"), order_mode="random", sample_latents=True)
    exs = examples(make_batch(TASKS, seed=3))
    rng = np.random.default_rng(4)
    for ex in exs:
        if layout.task_id(ex["task"]) == layout.EDIT:
            ex["image_src"] = rng.uniform(-1, 1, (64, 64, 3)).astype(np.float32)
    for i in (0, 3):  # CFG-dropped prompts: [BOS] alone (t2i and edit)
        d = dict(exs[i])
        d.update(layout.text_layout(int(d["task"]), [], None, cfg.max_text_len))
        exs.append(d)
    fixed, where_f = layout.layout_examples(exs, layout.fixed_spec(cfg.dims), cfg.dims, layout="fixed", uids=UIDS)
    spec = layout.packed_spec(cfg.dims, slots=96)
    packed, where_p = layout.layout_examples(exs, spec, cfg.dims, layout="packed", uids=UIDS)
    assert len(packed["tokens"]) < len(exs) and max(s for _, s in where_p) >= 3  # several examples per row
    params = nn.unbox(sharding.jit_once(lambda r: U(cfg).init(r, fixed, method=U.init_all))(jax.random.PRNGKey(0)))

    def run(p, b):
        def f(p):
            loss, _ = U(cfg).apply(p, b, jax.random.PRNGKey(7), 3, 100, method=U.loss)
            terms = U(cfg).apply(p, b, jax.random.PRNGKey(7), 3, 100, method=U.loss_terms)
            return loss, terms
        return jax.value_and_grad(f, has_aux=True)(p)
    run = jax.jit(run)
    return cfg, exs, params, {"fixed": (fixed, where_f, run(params, fixed)),
                              "packed": (packed, where_p, run(params, packed))}


def per_example(exs, batch, where, terms):
    """{example index: (text nlls in target order, visual loss or None)} from per-target / per-image terms."""
    owner = {rs: i for i, rs in enumerate(where)}
    out = {i: ([], None) for i in range(len(exs))}
    seg = np.asarray(batch["segment_ids"])
    for r, t in zip(*np.nonzero(np.asarray(batch["tgt_task"]) >= 0)):
        out[owner[(r, seg[r, batch["tgt_slot"][r, t]])]][0].append(float(terms["nll"][r, t]))
    uid_to_ex = {u: i for i, u in enumerate(UIDS)}
    for r, g in zip(*np.nonzero(np.asarray(batch["gen_start"]) >= 0)):
        i = uid_to_ex[int(batch["gen_uid"][r, g])]
        out[i] = (out[i][0], float(terms["visual"][r, g]))
    return out


def test_fixed_and_packed_give_the_same_losses_and_gradients(case):
    cfg, exs, _, res = case
    (lf, tf), gf = res["fixed"][2]
    (lp, tp), gp = res["packed"][2]
    np.testing.assert_allclose(lp, lf, rtol=1e-5)
    ef = per_example(exs, res["fixed"][0], res["fixed"][1], tf)
    ep = per_example(exs, res["packed"][0], res["packed"][1], tp)
    for i, ex in enumerate(exs):
        t = layout.task_id(ex["task"])
        assert len(ef[i][0]) == int(ex["text_loss_mask"].sum()) and (ef[i][1] is None) == (t not in layout.GEN_TASKS)
        np.testing.assert_allclose(ep[i][0], ef[i][0], rtol=1e-5, atol=1e-5, err_msg=f"example {i} text")
        if ef[i][1] is not None:
            np.testing.assert_allclose(ep[i][1], ef[i][1], rtol=1e-5, atol=1e-5, err_msg=f"example {i} visual")
    # Orders are random (per gen_uid), so both layouts really sampled the same permutations.
    assert (np.asarray(tf["orders"]) != np.arange(cfg.n_img)).any(-1).sum() >= 4
    flat_f, flat_p = jax.tree.leaves(gf), jax.tree.leaves(gp)
    scale = max(float(jnp.abs(g).max()) for g in flat_f)
    for a, b in zip(flat_f, flat_p):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale)
    assert scale > 0


@pytest.mark.parametrize("which", ["fixed", "packed"])
def test_text_nll_from_an_independent_next_token_rule(case, which):
    """Embed the rows, run the transformer, take logits at EVERY slot, and score each text slot's NEXT slot
    where the example's own text_loss_mask marks a target: the model's per-target NLL must match."""
    cfg, exs, params, res = case
    batch, where, ((_, terms), _) = res[which]
    model = U(cfg)
    b, g = batch["gen_start"].shape
    tok = model.apply(params, batch["image_gen"].reshape(b * g, 64, 64, 3), method=U.image_tokens)
    src = model.apply(params, batch["image_src"].reshape(b * g, 64, 64, 3), method=U.image_tokens)
    shape = (b, g, cfg.n_img, cfg.token_dim)

    @jax.jit
    def logits_everywhere(p):  # text segments never see other examples, so the gen tokens used do not matter
        x = model.apply(p, batch, tok.reshape(shape), terms["orders"], src.reshape(shape), method=U.embed_rows)
        return model.apply(p, model.apply(p, batch, x, method=U.forward_rows), method=U.text_logits)
    logp = np.asarray(jax.nn.log_softmax(logits_everywhere(params)))

    want, shifted = {}, {}  # (row, slot that predicts) -> NLL
    for i, (r, s) in enumerate(where):
        ex = exs[i]
        first = int(np.flatnonzero((batch["segment_ids"][r] == s) & (batch["kind"][r] == layout.K_TEXT))[0])
        for j in range(1, int(ex["text_input_mask"].sum())):
            if ex["text_loss_mask"][j]:
                want[(r, first + j - 1)] = -logp[r, first + j - 1, ex["text_tokens"][j]]
                shifted[(r, first + j - 1)] = -logp[r, first + j, ex["text_tokens"][j]]
    got = {(r, int(batch["tgt_slot"][r, t])): float(terms["nll"][r, t])
           for r, t in zip(*np.nonzero(np.asarray(batch["tgt_task"]) >= 0))}
    assert sorted(got) == sorted(want) and len(want) > 10
    keys = sorted(want)
    np.testing.assert_allclose([got[k] for k in keys], [want[k] for k in keys], rtol=1e-5, atol=1e-5)
    assert not np.allclose([got[k] for k in keys], [shifted[k] for k in keys], atol=1e-3)  # sees a 1-slot shift
