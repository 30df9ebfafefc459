"""FID / IS from features: the Frechet distance equals pytorch-fid's calculate_frechet_distance; reference
stats read from pytorch-fid's own .npz (written by its save_fid_stats from a folder of images, with random
Inception weights) equal the stats computed here from the same folder; IS equals the original formula."""
import numpy as np
import pytest
import torch
from PIL import Image

from tests.evals import fid_refs
from unifluid_jax.evals import fid


def _features(seed, n=300, d=64):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + rng.normal(size=d)


def test_fid_equals_pytorch_fid():
    _, _ = fid_refs.pytorch_fid()
    from pytorch_fid.fid_score import calculate_frechet_distance
    a, b = _features(0), _features(1)
    st = fid.FeatureStats()
    for i in range(0, len(a), 64):
        st.update(a[i:i + 64])
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    want = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), mu2, s2)
    assert fid.fid_against(st, mu2, s2) == pytest.approx(want, rel=1e-6)


def test_stats_files_and_dim_mismatch(tmp_path):
    a = _features(2)
    st = fid.FeatureStats().update(a)
    path = str(tmp_path / "ref.npz")
    fid.save_stats(path, st)
    mu, sigma = fid.load_stats(path)
    np.testing.assert_allclose(mu, a.mean(0), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(a, rowvar=False), atol=1e-10)
    with pytest.raises(ValueError, match="feature dim 64 but the features are 2048-d"):
        fid.fid_against(fid.FeatureStats().update(np.zeros((3, 2048))), mu, sigma)
    np.savez(str(tmp_path / "bad.npz"), m=mu)
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\]"):
        fid.load_stats(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        fid.load_stats(str(tmp_path / "nope.npz"))


def _original_is(logits, splits):
    """The original Inception-Score code's computation (softmax, per-split KL to the split's marginal)."""
    preds = torch.softmax(torch.from_numpy(logits), 1).numpy()
    scores = []
    n = preds.shape[0]
    for k in range(splits):
        part = preds[k * (n // splits):(k + 1) * (n // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return np.mean(scores), np.std(scores)


def test_inception_score():
    logits = np.random.default_rng(3).normal(size=(105, 1008)) * 4
    mean, std = fid.inception_score(logits, splits=5)
    want = _original_is(logits, 5)
    assert mean == pytest.approx(want[0], rel=1e-9) and std == pytest.approx(want[1], rel=1e-7)
    # Confident and diverse over 10 classes -> IS = 10; one class for all -> IS = 1.
    onehot = np.eye(10)[np.arange(100) % 10] * 60
    assert fid.inception_score(onehot, splits=2)[0] == pytest.approx(10, rel=1e-6)
    assert fid.inception_score(np.tile(onehot[:1], (100, 1)), splits=2)[0] == pytest.approx(1, rel=1e-6)


@pytest.mark.slow  # the 299 px Inception in torch and in JAX
def test_folder_stats_match_pytorch_fid(tmp_path):
    from unifluid_jax.convert import inception as convert
    from unifluid_jax.evals import inception
    sd = fid_refs.random_state_dict(1)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / "gray.png")  # RGB-converted
    _, pf = fid_refs.pytorch_fid()
    from pytorch_fid import fid_score
    from unittest import mock
    ref = str(tmp_path / "ref.npz")
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: sd):
        fid_score.save_fid_stats([str(folder), ref], 4, "cpu", 2048, num_workers=0)
    mu, sigma = fid.load_stats(ref)
    torch.save(sd, str(tmp_path / "w.pth"))
    ext = inception.Extractor(convert.load(str(tmp_path / "w.pth")), mode="pytorch_fid")
    st = fid.folder_stats(ext.pool3, str(folder), batch_size=4)
    assert st.n == 4
    np.testing.assert_allclose(st.mean(), mu, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(st.cov(), sigma, atol=1e-4, rtol=1e-4)
