"""The embedded end-to-end demo (`make demo`): data -> VAE -> UniFluid -> evaluation, resumable.

    python -m unifluid_jax.tools.demo --workdir=workdir/demo [--vae_steps=1000 --steps=1200 --quick]

Stages (each skipped when its output exists, so re-running resumes instead of starting over; the two
training stages also resume mid-run from their checkpoints):
  1. build the shapes dataset + SentencePiece tokenizer      -> WORKDIR/shapes
  2. train the small KL-VAE, measure held-out PSNR and the latent scaling factor -> WORKDIR/vae
  3. train the small UniFluid on mixed t2i + caption + vqa with the VAE frozen    -> WORKDIR/unifluid
  4. evaluate: shapes-GenEval, FD, CIDEr, VQA accuracy, sample grid              -> WORKDIR/eval
and writes WORKDIR/demo_summary.json with every number and where the time went.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging as absl_logging

FLAGS = flags.FLAGS


def _define_flags():
    """Defined only when run as a program, so importing `run` never clashes with main.py's flags."""
    flags.DEFINE_string("workdir", "workdir/demo", "output directory")
    flags.DEFINE_integer("vae_steps", 1000, "VAE training steps")
    flags.DEFINE_integer("steps", 1200, "UniFluid training steps")
    flags.DEFINE_integer("num_train", 4000, "training scenes (each gives one record per task)")
    flags.DEFINE_bool("quick", False, "a tiny smoke run (few steps, small eval) for tests")


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _load_config(name: str, arg: str):
    """configs/NAME.py of this checkout, loaded by path like --config=... does (any working directory)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_demo_config_{name}", os.path.join(CONFIGS, name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _finished(run_dir: str, steps: int) -> bool:
    """A training stage is done when its final checkpoint and summary exist (re-running it would only
    rewrite the summary)."""
    return (os.path.isdir(os.path.join(run_dir, "checkpoints", str(steps)))
            and os.path.exists(os.path.join(run_dir, "metrics_summary.json")))


def run(workdir: str, *, vae_steps: int, steps: int, num_train: int, quick: bool = False) -> dict:
    workdir = os.path.abspath(workdir)
    import jax

    from unifluid_jax import config as config_lib
    from unifluid_jax.evals import suite
    from unifluid_jax.models import unifluid
    from unifluid_jax.tools import build_shapes
    from unifluid_jax.train import checkpoint as ckpt_lib
    from unifluid_jax.train import trainer

    os.makedirs(workdir, exist_ok=True)
    times: dict[str, float] = {}
    data_dir = os.path.join(workdir, "shapes")

    t = time.perf_counter()
    if not os.path.exists(os.path.join(data_dir, "metadata.json")):
        _log(f"1/4 building the shapes dataset ({num_train} scenes x 4 tasks) in {data_dir}")
        build_shapes.build(data_dir, size=64, num_train=num_train, num_val=256, num_test=256,
                           num_geneval=8 if quick else 16)
    times["data"] = time.perf_counter() - t

    t = time.perf_counter()
    vae_dir = os.path.join(workdir, "vae")
    vae_cfg = _load_config("vae_tiny", f"data={data_dir},steps={vae_steps}")
    config_lib.validate(vae_cfg)
    if not _finished(vae_dir, vae_steps):
        _log(f"2/4 training the VAE for {vae_steps} steps -> {vae_dir}")
        trainer.Trainer(vae_cfg, vae_dir).run()
    with open(os.path.join(vae_dir, "vae_stats.json")) as f:
        vae_stats = json.load(f)
    _log(f"    VAE held-out PSNR {vae_stats['psnr_init']:.2f} dB (init) -> {vae_stats['psnr']:.2f} dB; "
         f"latent scaling factor {vae_stats['scaling_factor']:.4f}")
    times["vae"] = time.perf_counter() - t

    t = time.perf_counter()
    uf_dir = os.path.join(workdir, "unifluid")
    uf_cfg = _load_config("unifluid_demo", f"data={data_dir},vae={vae_dir},steps={steps},"
                                           f"scaling={vae_stats['scaling_factor']}")
    config_lib.validate(uf_cfg)
    if not _finished(uf_dir, steps):
        _log(f"3/4 training UniFluid for {steps} steps (t2i + caption + vqa, VAE frozen) -> {uf_dir}")
        trainer.Trainer(uf_cfg, uf_dir).run()
    with open(os.path.join(uf_dir, "metrics_summary.json")) as f:
        train_summary = json.load(f)
    times["unifluid"] = time.perf_counter() - t

    t = time.perf_counter()
    eval_dir = os.path.join(workdir, "eval")
    results_path = os.path.join(eval_dir, "eval_results.json")
    if os.path.exists(results_path) and json.load(open(results_path)).get("step") == steps:
        results = json.load(open(results_path))
    else:
        _log(f"4/4 evaluating -> {eval_dir}")
        model_cfg = unifluid.config_from_dict(uf_cfg.model)
        params = ckpt_lib.serving_params(ckpt_lib.load_numpy(uf_dir))
        n = 8 if quick else 48
        variables = {"params": jax.tree.map(jax.numpy.asarray, params)}
        results = suite.evaluate(unifluid.UniFluid(model_cfg), variables, data_dir,
                                 out_dir=eval_dir, num_geneval=n, num_caption=n, num_vqa=n,
                                 num_steps=20 if quick else 50, cfg_scale=2.0)
        results["step"] = steps
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1, default=float)
    times["eval"] = time.perf_counter() - t

    metrics = train_summary.get("metrics", {})
    summary = {"vae": vae_stats, "unifluid_train": {k: metrics[k]["mean_last10"] for k in sorted(metrics)
                                                    if k.startswith("train/")},
               "loss_curve_first_last": [train_summary.get("loss_curve", [])[:1],
                                         train_summary.get("loss_curve", [])[-1:]],
               "eval": results, "seconds": times}
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    _print_summary(summary, workdir)
    return summary


def _print_summary(s: dict, workdir: str) -> None:
    e = s["eval"]
    lines = [f"VAE PSNR (held-out): {s['vae']['psnr_init']:.2f} -> {s['vae']['psnr']:.2f} dB",
             "UniFluid train (mean of last logs): " + ", ".join(
                 f"{k.split('/')[-1]}={v:.4g}" for k, v in s["unifluid_train"].items()
                 if k.split("/")[-1] in ("loss", "visual_loss", "text_loss", "caption_token_acc", "vqa_token_acc"))]
    if "geneval" in e:
        lines.append("shapes-GenEval: " + ", ".join(f"{k}={v:.2f}" for k, v in e["geneval"].items()
                                                   if isinstance(v, float)))
        if "geneval_vae_ceiling" in e:
            lines.append(f"  (the VAE's ceiling: drawn scenes through the VAE score "
                         f"{e['geneval_vae_ceiling']['overall']:.2f} overall)")
        lines.append(f"FD (shapes features, not Inception): {e['fd_shapes_features']:.3f}")
    if "caption" in e:
        lines.append(f"captions: CIDEr-D={e['caption']['cider']:.3f} exact={e['caption']['exact_match']:.2f}")
    if "vqa" in e:
        lines.append(f"VQA: exact={e['vqa']['exact_match']:.2f} soft={e['vqa']['soft_accuracy']:.2f}")
    lines.append("time (s): " + ", ".join(f"{k}={v:.0f}" for k, v in s["seconds"].items()))
    lines.append(f"samples: {os.path.join(workdir, 'eval', 'samples.png')}; all numbers: "
                 f"{os.path.join(workdir, 'demo_summary.json')}")
    print("\n".join(["", "=== UniFluid demo ==="] + lines), flush=True)


def main(argv):
    del argv
    import logging
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("unifluid_jax").setLevel(logging.INFO)
    q = FLAGS.quick
    run(FLAGS.workdir, vae_steps=20 if q else FLAGS.vae_steps, steps=20 if q else FLAGS.steps,
        num_train=200 if q else FLAGS.num_train, quick=q)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
