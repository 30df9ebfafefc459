"""TFDS adapter on a small ArrayRecord TFDS dataset built by the test (no TensorFlow needed)."""
import io

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from unifluid_jax.data import layout as L  # noqa: E402
from unifluid_jax.data import pipeline as P  # noqa: E402
from unifluid_jax.data import shapes  # noqa: E402
from unifluid_jax.data.tfds_source import TfdsSource  # noqa: E402
from unifluid_jax.data.tokenizer import train_tokenizer  # noqa: E402

N = 6


def _png(i):
    buf = io.BytesIO()
    Image.fromarray(shapes.render(shapes.scene_for_index("train", i, size=32))).save(buf, format="PNG")
    buf.seek(0)
    return buf


class ToyShapesCaps(tfds.core.GeneratorBasedBuilder):
    """Nested features like coco_captions: image, image/id, captions: Sequence({text})."""
    # A one-part module name: tfds then skips resolving the test package as a resource path (which needs
    # the optional importlib_resources package, not installed here).
    __module__ = "toy_shapes_caps_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/id": tfds.features.Scalar(np.int64),
            "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(N):
            cap = shapes.caption(shapes.scene_for_index("train", i, size=32))
            yield i, {"image": _png(i), "image/id": i, "captions": {"text": [cap, "second caption"]}}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    ToyShapesCaps(data_dir=str(d), file_format="array_record").download_and_prepare()
    return d


FIELD_MAP = {"image": "image", "caption": "captions/text", "id": "image/id"}


def test_records_from_tfds(tfds_dir):
    src = TfdsSource("toy_shapes_caps", split="train", data_dir=str(tfds_dir), field_map=FIELD_MAP)
    assert len(src) == N
    got = {int(r["id"]): r for r in (src[i] for i in range(N))}
    for i in range(N):
        scene = shapes.scene_for_index("train", i, size=32)
        assert got[i]["caption"] == shapes.caption(scene)
        assert isinstance(got[i]["image"], bytes)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(got[i]["image"]))), shapes.render(scene))
    import pickle
    assert pickle.loads(pickle.dumps(src))[0] == src[0]


def test_pipeline_over_tfds(tfds_dir, tmp_path):
    tok = train_tokenizer(shapes.vocabulary_texts() + [shapes.caption(shapes.scene_for_index("train", i, 32))
                                                       for i in range(50)], str(tmp_path / "tok"), 128)
    cfg = P.default_config()
    cfg.sources = [{"kind": "tfds", "name": "toy_shapes_caps", "split": "train", "data_dir": str(tfds_dir),
                    "field_map": FIELD_MAP, "task": "caption", "weight": 1.0},
                   {"kind": "tfds", "name": "toy_shapes_caps", "split": "train", "data_dir": str(tfds_dir),
                    "field_map": FIELD_MAP, "task": "t2i", "weight": 1.0}]
    cfg.gen_size, cfg.und_size, cfg.max_text_len, cfg.per_host_batch_size = 32, 32, 48, 4
    cfg.tokenizer, cfg.read_threads = tok, 1
    b = next(P.make_iterator(cfg, shard_index=0, shard_count=1))
    assert sorted(b["task"].tolist()) == [L.T2I, L.T2I, L.CAPTION, L.CAPTION]
    assert b["image_gen"].shape == (4, 32, 32, 3) and b["num_skipped"].sum() == 0
    cfg.sources[0]["task"] = ""
    with pytest.raises(P.DataError, match="task"):
        P.make_iterator(cfg, shard_index=0, shard_count=1)
