"""--mode=fid_eval: bad inputs fail before anything compiles; one device, an 8-device mesh and two processes
give the same images and metrics; a run killed mid-way and restarted ends with the uninterrupted run's numbers."""
import json
import socket
import subprocess
import time

import numpy as np
import pytest
from flax import traverse_util
from PIL import Image

from tests.train import runner
from unifluid_jax import main
from unifluid_jax.config import ConfigError
from unifluid_jax.convert import inception as inception_convert
from unifluid_jax.evals import coco
from unifluid_jax.train import trainer

pytestmark = pytest.mark.xdist_group("fid_eval")
CONFIG = "tests/evals/fid_eval_config.py"
PROMPTS = [f"a photo of a {c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square",
                                                                                          "triangle", "cross", "star")]
BATCH = 8  # 20 prompts: batches of 8, 8, 4 (+4 padding rows)


def _inputs(root, weights=True):
    """Prompts file, pool3 reference stats (pytorch-fid's layout) and an Inception weights file (a Flax init
    exported by the converter, whose parity with pytorch-fid test_inception.py checks)."""
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    rng = np.random.default_rng(0)
    np.savez(str(root / "ref.npz"), mu=rng.normal(size=2048) * 0.1, sigma=np.eye(2048) * 0.02)
    if weights:  # random He-scaled weights in the converter's expected shapes (no network run to init them)
        exp = inception_convert._expected()
        params = {p: rng.normal(size=s.shape) * (2 / np.prod(s.shape[:-1])) ** 0.5 if p[-1] == "kernel"
                  else (1 + rng.random(s.shape) if p[-1] in ("scale", "var") else 0.1 * rng.normal(size=s.shape))
                  for p, s in exp.items()}
        params = {"params": traverse_util.unflatten_dict({p: v.astype(np.float32) for p, v in params.items()})}
        inception_convert.save(params, str(root / "pt_inception-test.pth"))
    return root


def _overrides(root, out, **fid_eval):
    s = {**dict(inception=str(root / "pt_inception-test.pth"), ref_stats=str(root / "ref.npz"), mode="clean",
                splits=2, inception_size=75), **fid_eval}
    return ([f"--config.infer.prompts={root / 'prompts.txt'}", f"--config.infer.out={out}",
             f"--config.infer.batch_size={BATCH}", "--config.infer.num_steps=4", "--mode=fid_eval"] +
            [f"--config.fid_eval.{k}={v}" for k, v in s.items()])


def _config(shapes_dir, root, out, **fid_eval):
    cfg = runner.load_config(CONFIG, f"data={shapes_dir},steps=2,batch=8")
    cfg.mesh = dict(data=-1, fsdp=1, tensor=1)
    for o in _overrides(root, out, **fid_eval):
        if o.startswith("--config."):
            key, val = o[len("--config."):].split("=", 1)
            sec, name = key.split(".")
            cfg[sec][name] = type(cfg[sec][name])(val)
    return cfg


def test_bad_inputs_fail_first(shapes_dir, tmp_path):
    root = _inputs(tmp_path, weights=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cfg = _config(shapes_dir, root, tmp_path / "out")
    cfg.infer.prompts = str(empty)
    with pytest.raises(ConfigError, match="empty.txt.*has no entries"):
        main.run(cfg, str(tmp_path / "no_run"), "fid_eval")
    cfg = _config(shapes_dir, root, tmp_path / "out", inception=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="missing.pth.*pt_inception-2015-12-05-6726825d.pth"):
        main.run(cfg, str(tmp_path / "no_run"), "fid_eval")
    np.savez(str(tmp_path / "ref64.npz"), mu=np.zeros(64), sigma=np.eye(64))
    cfg = _config(shapes_dir, root, tmp_path / "out", ref_stats=str(tmp_path / "ref64.npz"))
    with pytest.raises(ConfigError, match="ref64.npz has feature dim 64.*2048"):
        main.run(cfg, str(tmp_path / "no_run"), "fid_eval")
    assert not (tmp_path / "out").exists()  # nothing written
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "fid_eval_settings.json").write_text(json.dumps(dict(
        coco._manifest(_config(shapes_dir, root, tmp_path / "old"), coco.settings(cfg), PROMPTS), batch_size=4)))
    cfg = _config(shapes_dir, root, tmp_path / "old")
    with pytest.raises(ConfigError, match="old holds an fid_eval run with other settings.*batch_size: 4 there, 8 now"):
        main.run(cfg, str(tmp_path / "no_run"), "fid_eval")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(shapes_dir, root, run, out, devices, log, **env):
    return runner.start_main(f"{CONFIG}:data={shapes_dir},steps=2,batch=8", run, *_overrides(root, out),
                             "--config.mesh.data=-1", "--config.mesh.fsdp=1", devices=devices, log=log, **env)


def _wait(procs, logs, timeout=900):
    for p, log in zip(procs, logs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        log.seek(0)
        assert rc == 0, log.read()[-4000:]


def _images(out):
    files = sorted((out / "images").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(len(PROMPTS))]
    return np.stack([np.asarray(Image.open(f)) for f in files])


def _results(out):
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_devices_processes_and_resume_agree(shapes_dir, tmp_path):
    root = _inputs(tmp_path)
    run = tmp_path / "run"
    trainer.Trainer(_config(shapes_dir, root, tmp_path / "x"), str(run)).run()
    logs = [open(tmp_path / f"{n}.log", "w+") for n in ("one", "p0", "p1")]
    port = _free_port()
    procs = [_start(shapes_dir, root, run, tmp_path / "one", 1, logs[0])]
    procs += [_start(shapes_dir, root, run, tmp_path / "two", 4, logs[1 + pid],
                     JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=pid)
              for pid in range(2)]
    eight = main.run(_config(shapes_dir, root, tmp_path / "eight"), str(run), "fid_eval")  # this process: 8 devices
    _wait(procs, logs)
    one = _results(tmp_path / "one")
    assert one["num_images"] == len(PROMPTS) and np.isfinite(one["fid"]) and one["inception_score"] >= 1
    ref_images = _images(tmp_path / "one")
    assert ref_images.shape == (20, 64, 64, 3) and ref_images.std() > 0
    for name, res in (("eight", eight), ("two", _results(tmp_path / "two"))):
        np.testing.assert_array_equal(_images(tmp_path / name), ref_images, err_msg=name)
        for k in ("fid", "inception_score"):
            assert res[k] == pytest.approx(one[k], rel=1e-5), (name, k, res[k], one[k])
    assert "process 0: " in open(tmp_path / "p0.log").read() and "ETA" in open(tmp_path / "p0.log").read()

    # Kill after the first batch's features are written, restart: the rest is generated, the first batch not.
    killed = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w+")
    p = _start(shapes_dir, root, run, killed, 1, log)
    first = killed / "features" / "000000.npz"
    while not first.exists():
        assert p.poll() is None, open(tmp_path / "killed.log").read()[-3000:]
        time.sleep(0.05)
    p.kill()
    p.wait()
    done = sorted(f.name for f in (killed / "features").iterdir() if f.suffix == ".npz")
    assert not (killed / "results.json").exists() and len(done) < 3, done
    stamp = first.stat().st_mtime_ns
    log2 = open(tmp_path / "resumed.log", "w+")
    _wait([_start(shapes_dir, root, run, killed, 1, log2)], [log2])
    log2.seek(0)
    assert "already on disk; resuming" in log2.read()
    assert first.stat().st_mtime_ns == stamp  # not regenerated
    np.testing.assert_array_equal(_images(killed), ref_images)
    resumed = _results(killed)
    assert resumed == one


def _tiny_clip(folder):
    """A random transformers CLIPModel folder with its own tokenizer (byte-level alphabet, no merges) and
    image processor, as `save_pretrained` writes them: what a user passes as fid_eval.clip."""
    import torch
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel
    chars = sorted(set(ByteLevel.alphabet()))
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(folder))
    transformers.CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(
        str(folder))
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=40, eos_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                           image_size=30, patch_size=6),
        projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    model.save_pretrained(str(folder))
    return model


@pytest.mark.slow
def test_clip_score_equals_transformers_on_the_written_images(shapes_dir, tmp_path):
    """fid_eval's CLIP score == transformers' CLIPModel + CLIPProcessor on the PNGs fid_eval wrote and their
    prompts: 100 * max(cos, 0), averaged."""
    import torch
    import transformers
    root = _inputs(tmp_path)
    run = tmp_path / "run"
    trainer.Trainer(_config(shapes_dir, root, tmp_path / "x"), str(run)).run()
    model = _tiny_clip(tmp_path / "clip")
    res = main.run(_config(shapes_dir, root, tmp_path / "out", clip=str(tmp_path / "clip")), str(run), "fid_eval")
    assert res["clip_checkpoint"] == str(tmp_path / "clip")

    proc = transformers.CLIPProcessor.from_pretrained(str(tmp_path / "clip"))
    inputs = proc(text=PROMPTS, images=list(_images(tmp_path / "out")), return_tensors="pt", padding=True)
    with torch.no_grad():
        t = model.get_text_features(input_ids=inputs["input_ids"],
                                    attention_mask=inputs["attention_mask"]).pooler_output.numpy()
        i = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.numpy()
    cos = (t * i).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(i, axis=-1))
    assert np.ptp(cos) > 0.01  # the images differ, so their scores do
    assert res["clip_score"] == pytest.approx(float(np.mean(100 * np.maximum(cos, 0))), rel=1e-4, abs=1e-3)
