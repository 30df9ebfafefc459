"""FID Inception: the Flax network equals pytorch-fid's (random weights through its own loading code) on
pool3 and logits; the weight converter round-trips and names the file and tensor on bad input; the
'clean' preprocessing equals clean-fid's resize + normalisation."""
import numpy as np
import pytest
import torch

from tests.evals import fid_refs
from unifluid_jax.convert import inception as convert
from unifluid_jax.evals import inception


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = fid_refs.random_state_dict(0)
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-test.pth")
    torch.save(sd, path)
    return sd, path


@pytest.fixture(scope="module")
def extractor(weights):
    return inception.Extractor(convert.load(weights[1]), mode="pytorch_fid")


@pytest.mark.slow  # ~40 s: the full 299 px network compiled on CPU
def test_matches_pytorch_fid(weights, extractor):
    sd, _ = weights
    pool_net, full_net = fid_refs.fid_models(sd)
    images = np.random.default_rng(0).integers(0, 256, (2, 48, 72, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # pytorch-fid's ToTensor
    with torch.no_grad():
        want_pool = pool_net(x)[0].squeeze(-1).squeeze(-1).numpy()
        net_in = 2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        want_logits = full_net(net_in).numpy()
    got = extractor(images)
    np.testing.assert_allclose(np.asarray(inception.preprocess(images, "pytorch_fid")),
                               net_in.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    assert got["pool3"].shape == (2, 2048) and np.abs(want_pool).max() > 0.1
    np.testing.assert_allclose(got["pool3"], want_pool, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got["logits"], want_logits, atol=1e-4, rtol=1e-4)
    unbiased = want_logits - sd["fc.bias"].numpy()
    np.testing.assert_allclose(got["logits_unbiased"], unbiased, atol=1e-4, rtol=1e-4)


def test_converter_round_trip(weights, tmp_path):
    sd, path = weights
    params = convert.load(path)
    back = convert.params_to_torch(params)
    want = {k: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert sorted(back) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    # The exported file loads strictly into pytorch-fid's network and gives the same params again.
    out = str(tmp_path / "again.pth")
    convert.save(params, out)
    _, full_net = fid_refs.fid_models(torch.load(out, weights_only=True))
    assert full_net.Mixed_7c.branch_pool.bn.running_var.equal(sd["Mixed_7c.branch_pool.bn.running_var"])
    again = convert.load(out)
    flat, flat_again = (convert.traverse_util.flatten_dict(p) for p in (params, again))
    assert flat.keys() == flat_again.keys()
    for k in flat:
        np.testing.assert_array_equal(np.asarray(flat[k]), np.asarray(flat_again[k]), err_msg=str(k))


def test_bad_weights(weights, tmp_path):
    sd, _ = weights
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
        convert.load(str(tmp_path / "nope.pth"))
    missing = {k: v for k, v in sd.items() if k != "Mixed_6b.branch7x7_2.conv.weight"}
    torch.save(missing, str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match=r"missing.pth.*pt_inception.*no tensor 'Mixed_6b.branch7x7_2.conv.weight'"):
        convert.load(str(tmp_path / "missing.pth"))
    wrong = dict(sd, **{"fc.weight": torch.zeros(1000, 2048)})
    torch.save(wrong, str(tmp_path / "wrong.pth"))
    with pytest.raises(ValueError, match=r"wrong.pth.*'fc.weight' has shape \(1000, 2048\)"):
        convert.load(str(tmp_path / "wrong.pth"))


def test_clean_mode_matches_clean_fid():
    from cleanfid.resize import build_resizer
    resize = build_resizer("clean")
    images = np.random.default_rng(1).integers(0, 256, (2, 37, 64, 3), dtype=np.uint8)
    want = np.stack([resize(im) for im in images])
    got = inception.clean_resize(images)
    assert got.dtype == np.float32 and got.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(got, want)
    # InceptionV3W (clean-fid's network) normalises the resized [0, 255] input as (x - 128) / 128.
    np.testing.assert_array_equal(np.asarray(inception.preprocess(images, "clean")), (want - 128) / 128)


def test_bad_images():
    with pytest.raises(ValueError, match="uint8"):
        inception.preprocess(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="mode 'tf'"):
        inception.preprocess(np.zeros((1, 8, 8, 3), np.uint8), "tf")
