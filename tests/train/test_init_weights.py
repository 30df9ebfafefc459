"""checkpoint.init_subtrees from published formats: tiny random transformers Gemma-2 / SigLIP and diffusers VAE
folders (built with those libraries) give the direct converters' params, the first train step's loss equals the
loss from those params, and a mismatched checkpoint stops with one error naming the tensor and both shapes."""
import jax
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")

from tests.train import runner  # noqa: E402
from unifluid_jax.config import ConfigError  # noqa: E402
from unifluid_jax.convert import gemma as gemma_conv, siglip as siglip_conv, vae as vae_conv  # noqa: E402
from unifluid_jax.models import unifluid  # noqa: E402
from unifluid_jax.train import checkpoint as ckpt_lib, init_weights, sharding, trainer  # noqa: E402

pytestmark = pytest.mark.xdist_group("init_weights")


def _folders(tmp, mlp_dim=128):
    """HF / diffusers folders sized like configs/unifluid_tiny.py's model (written by those libraries)."""
    import diffusers
    import transformers
    torch.manual_seed(0)
    lm = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=mlp_dim, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh"))
    for p in lm.parameters():  # norms are 0 at init: make every tensor informative
        torch.nn.init.normal_(p, std=0.05)
    lm.save_pretrained(tmp / "gemma")
    vis = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, vision_use_head=False))
    vis.save_pretrained(tmp / "siglip")
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 64, 64],
                                  layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)
    vae.save_pretrained(tmp / "vae")
    return lm, vis, vae


def _config(shapes_dir, tmp):
    cfg = runner.load_config("configs/unifluid_tiny.py", f"data={shapes_dir},steps=1,batch=8")
    cfg.mesh = dict(data=-1, fsdp=2, tensor=1)
    cfg.optimizer.ema_decay = 0.5
    cfg.checkpoint.init_subtrees = [dict(format="hf", path=str(tmp / "gemma"), dst="llm"),
                                    dict(format="hf", path=str(tmp / "siglip"), dst="siglip"),
                                    dict(format="diffusers", path=str(tmp / "vae"), dst="vae")]
    return cfg


def _flat(tree):
    return traverse_util.flatten_dict(jax.tree.map(np.asarray, tree))


def test_published_folders_initialise_the_run(shapes_dir, tmp_path):
    lm, vis, vae = _folders(tmp_path)
    cfg = _config(shapes_dir, tmp_path)
    mc = unifluid.config_from_dict(cfg.model)
    direct = {"llm": gemma_conv.params_from_hf(lm.state_dict(), mc.llm),
              "siglip": siglip_conv.from_hf(vis.state_dict(), mc.siglip)["params"],
              "vae": vae_conv.from_diffusers(vae.state_dict(), mc.vae)["params"]}
    t = trainer.Trainer(cfg, str(tmp_path / "run"))
    with t.context():
        it = iter(t.task.make_input(cfg, t.shard_index, t.shard_count))
        state, step = t.initial_state(ckpt_lib.Checkpointer(str(tmp_path / "run"), cfg.checkpoint), it)
        assert step == 0
        for name, want in direct.items():
            for tree in (state["params"][name], state["ema_params"][name]):
                got = _flat(tree)
                assert set(got) == set(_flat(want)), name
                for k, v in _flat(want).items():
                    assert np.array_equal(got[k], v), (name, k)
            # placed in the run's shardings, not gathered on one device
            for leaf, shd in zip(jax.tree.leaves(state["params"][name]),
                                 jax.tree.leaves(t.state_shardings["params"][name])):
                assert leaf.sharding == shd
        # The first step from the loaded state and from the direct converters' params: same loss.
        batch = sharding.make_global_batch(next(it), t.batch_shardings, t.global_batch)
        ref = jax.tree.map(lambda x: x, state)
        ref["params"] = {**state["params"], **{k: jax.device_put(v, t.state_shardings["params"][k])
                                               for k, v in direct.items()}}
        ref = jax.tree.map(np.asarray, ref)  # donation-safe copies
        _, out = t.train_step(state, batch)
        ref = jax.tree.map(lambda x, s: jax.device_put(x, s), ref, t.state_shardings)
        _, ref_out = t.train_step(ref, batch)
    assert np.isfinite(out["train/loss"]) and float(out["train/loss"]) == float(ref_out["train/loss"])


def test_mismatched_published_checkpoint_names_the_tensor(shapes_dir, tmp_path):
    _folders(tmp_path, mlp_dim=96)
    cfg = _config(shapes_dir, tmp_path)
    t = trainer.Trainer(cfg, str(tmp_path / "run"))
    with t.context(), pytest.raises(gemma_conv.CheckpointError,
                                    match=r"model.layers.0.mlp.gate_proj.weight' has shape \(96, 64\) but the "
                                          r"config expects \(128, 64\)"):
        t.initial_state(ckpt_lib.Checkpointer(str(tmp_path / "run"), cfg.checkpoint), iter([]))


def test_bad_entries_fail_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"init_subtrees\[0\].format: 'safetensors' is unknown"):
        init_weights.validate_entries([dict(format="safetensors", path=str(tmp_path), dst="llm")])
    with pytest.raises(ConfigError, match=r"init_subtrees\[0\].dst: format 'diffusers' fills vae, not 'llm'"):
        init_weights.validate_entries([dict(format="diffusers", path=str(tmp_path), dst="llm")])
    with pytest.raises(ConfigError, match=r"init_subtrees\[0\].path: no such file or directory"):
        init_weights.validate_entries([dict(format="hf", path=str(tmp_path / "nope"), dst="llm")])
