"""--mode=sample / caption / vqa / edit / eval on a briefly trained tiny run, and their bad-input errors."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from tests.train import runner
from unifluid_jax import main
from unifluid_jax.config import ConfigError
from unifluid_jax.data import records
from unifluid_jax.train import trainer

# One xdist worker for the whole module: its session fixture (a compiled init / a trained run) is then
# built once, not once per worker.
pytestmark = pytest.mark.xdist_group("inference_cli")


@pytest.fixture(scope="session")  # session, not module: slow-first ordering may split the module
def run_dir(shapes_dir, tmp_path_factory):
    cfg = _config(shapes_dir)
    workdir = str(tmp_path_factory.mktemp("run"))
    trainer.Trainer(cfg, workdir, devices=jax.devices()[:1]).run()  # not a sharding test
    return workdir


def _config(shapes_dir, **infer):
    cfg = runner.load_config("configs/unifluid_tiny.py", f"data={shapes_dir},steps=2,batch=8")
    cfg.mesh = dict(data=-1, fsdp=1, tensor=1)
    cfg.train.log_every = 1
    cfg.infer.update({"num_steps": 4, "batch_size": 4, **infer})
    cfg.eval.update(dict(num_geneval=4, num_caption=4, num_vqa=4, batch_size=4, num_steps=4))
    return cfg


def _images(shapes_dir, tmp_path, n=3):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, rec in enumerate(records.read_records(os.path.join(shapes_dir, "test", "caption*"))):
        if i == n:
            break
        (folder / f"img{i}.png").write_bytes(rec["image"])
    return folder


def test_sample_writes_pngs_and_grid(shapes_dir, run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a red circle\n\na photo of two blue squares\na green cross\n")
    out = main.run(_config(shapes_dir, prompts=str(prompts), out=str(tmp_path / "out")), run_dir, "sample")
    assert out["num_images"] == 3  # the blank line is not a prompt; nothing else is skipped
    for i in range(3):
        im = np.asarray(Image.open(tmp_path / "out" / f"sample_{i:04d}.png"))
        assert im.shape == (64, 64, 3)
    assert (tmp_path / "out" / "samples_grid.png").exists()


def test_caption_vqa_edit(shapes_dir, run_dir, tmp_path):
    folder = _images(shapes_dir, tmp_path)
    out = main.run(_config(shapes_dir, images=str(folder), out=str(tmp_path / "o")), run_dir, "caption")
    rows = [json.loads(l) for l in open(out["out"])]
    assert [r["image"] for r in rows] == ["img0.png", "img1.png", "img2.png"]
    # Greedy captions do not depend on the batch an image is decoded in (padding rows must not leak).
    out1 = main.run(_config(shapes_dir, images=str(folder), out=str(tmp_path / "o1"), batch_size=1), run_dir,
                    "caption")
    assert [json.loads(l)["caption"] for l in open(out1["out"])] == [r["caption"] for r in rows]
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"image": f"images/img{i}.png", "question": "how many shapes are there?"})
                          + "\n" for i in range(3)))
    out = main.run(_config(shapes_dir, questions=str(qs), out=str(tmp_path / "o")), run_dir, "vqa")
    assert len([json.loads(l) for l in open(out["out"])]) == 3
    pairs = tmp_path / "e.jsonl"
    pairs.write_text(json.dumps({"image": "images/img0.png", "instruction": "remove the circle"}) + "\n")
    out = main.run(_config(shapes_dir, pairs=str(pairs), out=str(tmp_path / "o")), run_dir, "edit")
    assert out["num_images"] == 1


def test_eval_mode(shapes_dir, run_dir, tmp_path):
    cfg = _config(shapes_dir, out=str(tmp_path))
    res = main.run(cfg, run_dir, "eval")
    g = res["geneval"]
    assert g["num_images"] == cfg.eval.num_geneval
    cats = [k for k, v in g.items() if isinstance(v, float) and k != "overall"]
    assert cats and set(cats) <= set(res["geneval_chance"])  # every category beside its chance baseline
    assert g["overall"] == pytest.approx(np.mean([g[c] for c in cats]))  # GenEval's unweighted category mean
    assert "cider" in res["caption"] and "soft_accuracy" in res["vqa"]
    assert (tmp_path / "eval" / "eval_results.json").exists()


def test_bad_inputs_name_the_item(shapes_dir, run_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty.txt.*no entries"):
        main.run(_config(shapes_dir, prompts=str(empty)), run_dir, "sample")
    long = tmp_path / "long.txt"
    long.write_text("a red circle\n" + " ".join(["a large red circle"] * 30) + "\n")
    with pytest.raises(ConfigError, match="prompt 1 .* too long"):
        main.run(_config(shapes_dir, prompts=str(long)), run_dir, "sample")
    bad = tmp_path / "q.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    bad.write_text(json.dumps({"image": "broken.png", "question": "how many?"}) + "\n")
    with pytest.raises(ConfigError, match="broken.png.*not an image"):
        main.run(_config(shapes_dir, questions=str(bad)), run_dir, "vqa")
    ok = tmp_path / "ok.txt"
    ok.write_text("a red circle\n")
    cfg = _config(shapes_dir, prompts=str(ok))
    cfg.model.diffusion.width = 48
    with pytest.raises(ConfigError, match="does not match config.model.*head"):
        main.run(cfg, run_dir, "sample")
