"""CLIP towers: the Flax port equals transformers.CLIPModel (tiny random config, save_pretrained) on text and
image embeddings; the converter round-trips; CLIP score is 100 * max(cos, 0) averaged; preprocessing
equals CLIPImageProcessor's."""
import numpy as np
import pytest
import torch
import transformers

from unifluid_jax.convert import clip as convert
from unifluid_jax.evals import clip_score


def _tiny(tmp_path, eos_token_id=98, act="quick_gelu"):
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=16, eos_token_id=eos_token_id,
                         hidden_act=act),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=30, patch_size=6, hidden_act=act),
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases too
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    return model


@pytest.mark.parametrize("eos_token_id,act", [(98, "quick_gelu"), (2, "gelu")])
def test_matches_transformers(tmp_path, eos_token_id, act):
    model = _tiny(tmp_path, eos_token_id, act)
    cfg, params, _ = convert.load(str(tmp_path), with_tokenizer=False)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 90, (3, 16))
    tokens[0, 5], tokens[1, 15], tokens[2, 9] = 98, 98, 98  # EOS (the largest id too: both pooling rules agree)
    tokens[2, 12] = 98  # a second EOS after the first: the first one pools
    pixels = rng.normal(size=(2, 3, 30, 30)).astype(np.float32)
    with torch.no_grad():
        want_t = model.get_text_features(input_ids=torch.from_numpy(tokens)).pooler_output.numpy()
        want_i = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output.numpy()
    m = clip_score.CLIP(cfg)
    got_t = m.apply(params, tokens, method=clip_score.CLIP.text)
    got_i = m.apply(params, pixels.transpose(0, 2, 3, 1), method=clip_score.CLIP.image)
    np.testing.assert_allclose(got_t, want_t, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got_i, want_i, atol=1e-4, rtol=1e-4)
    # Round trip: export equals the transformers state dict (minus its position_ids buffers).
    back = convert.params_to_hf(params, cfg)
    sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape, k
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_score_formula():
    t = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    i = np.array([[2.0, 0.0], [-1.0, 0.0], [1.0, 1.0]])
    # cos = 1, -1 (clipped to 0), 1/sqrt(2)
    assert clip_score.clip_score(t, i) == pytest.approx(100 * (1 + 0 + 2 ** -0.5) / 3)


def test_preprocess_matches_clip_image_processor():
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    cfg = clip_score.CLIPConfig(text=None, vision=None, vocab_size=0, max_text_len=0, eos_token_id=0,
                                image_size=30, patch_size=6, projection_dim=0)
    images = np.random.default_rng(1).integers(0, 256, (2, 41, 57, 3), dtype=np.uint8)
    want = proc(list(images), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(clip_score.preprocess(images, cfg), want, atol=1e-5)


def test_bad_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert.load(str(tmp_path), with_tokenizer=False)
    _tiny(tmp_path)
    cfg, params, _ = convert.load(str(tmp_path), with_tokenizer=False)
    sd = convert.params_to_hf(params, cfg)
    del sd["text_model.encoder.layers.1.mlp.fc2.weight"]
    with pytest.raises(ValueError, match="no tensor 'text_model.encoder.layers.1.mlp.fc2.weight'"):
        convert.params_from_hf(sd, cfg)
