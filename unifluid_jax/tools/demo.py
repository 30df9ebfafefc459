"""The embedded end-to-end demo (`make demo`): data -> VAE -> UniFluid -> evaluation, resumable.

    python -m unifluid_jax.tools.demo --workdir=workdir/demo [--preset=short|long|quick] [--seed=0]

Stages (each skipped when its output exists, so re-running resumes instead of starting over; the training
stages also resume mid-run from their checkpoints):
  1. build the shapes dataset + SentencePiece tokenizer                          -> WORKDIR/shapes
  2. train the small KL-VAE, measure held-out PSNR and the latent scaling factor -> WORKDIR/vae
  3. train the small SigLIP (big_vision's sigmoid loss on the caption pairs)     -> WORKDIR/siglip
  4. train UniFluid on mixed t2i + caption + vqa, VAE and SigLIP image tower frozen -> WORKDIR/unifluid
  5. evaluate: shapes-GenEval, FD, CIDEr, VQA accuracy, each beside its chance baseline; sample grid
                                                                                 -> WORKDIR/eval
and writes WORKDIR/demo_summary.json with every number and where the time went. Each stage prints one
progress line. `--seed` changes the dataset (scenes, GenEval prompts), the initialisation and the data order.

The recipe (PRESETS) is the measured one; the README's demo section gives the table of what was tried.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings

from absl import app, flags, logging as absl_logging

FLAGS = flags.FLAGS

# The UniFluid stage's recipe: the arg string of configs/unifluid_demo.py, so the stage is reproducible with
# `python -m unifluid_jax.main --config=configs/unifluid_demo.py:...`. Packed rows (several examples per row,
# data/packing.py): 2x the examples per step, 1.23-1.29x the examples per second of fixed rows
# (bench/bench_demo_step.py, measured before the t2i 2 mix and the 64 px SigLIP, not re-run); t2i twice as often as each understanding task; the image-token order raster
# from 35% of the run (sampling is raster); constant lr, decayed over the last 20% (wsd).
RECIPE = ("layout=packed,mix=t2i:2/caption:0.5/vqa:0.5,order=annealed,anneal=0.1/0.35,batch_mul=4,text_weight=0.2,"
          "lr=1e-3,schedule=wsd,batch=32")
# Every knob of the demo, per preset. The VAE bounds generation: drawn scenes through the VAE score 0.71 on
# shapes-GenEval after 1000 constant-lr steps, 0.97 after 1200 wsd steps, 1.00 after 3000 (README).
PRESETS = {
    "short": dict(num_train=8000, geneval_fraction=1.0, vae_steps=1200, siglip_steps=500, steps=500, num_eval=25,
                  unifluid=RECIPE,
                  cfg_scale=3.0, cfg_schedule="constant", temperature=1.0, num_sample_steps=50),
    "long": dict(num_train=20000, geneval_fraction=1.0, vae_steps=3000, siglip_steps=800, steps=4000, num_eval=25,
                 unifluid=RECIPE,
                 cfg_scale=3.0, cfg_schedule="constant", temperature=1.0, num_sample_steps=50),
    "quick": dict(num_train=64, geneval_fraction=1.0, vae_steps=20, siglip_steps=10, steps=10, num_eval=2,
                  unifluid=RECIPE.replace("batch=32", "batch=8"),
                  cfg_scale=3.0, cfg_schedule="constant", temperature=1.0, num_sample_steps=20),
}


def _define_flags():
    """Defined only when run as a program, so importing `run` never clashes with main.py's flags."""
    flags.DEFINE_string("workdir", "workdir/demo", "output directory")
    flags.DEFINE_enum("preset", "short", sorted(PRESETS), "recipe: short (~20 min on 2 CPU cores), long, quick")
    flags.DEFINE_integer("seed", 0, "dataset / initialisation / data-order seed")
    flags.DEFINE_bool("quick", False, "same as --preset=quick (a one-minute smoke run)")


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


class _ProgressLine(logging.Handler):
    """Turns the trainer's per-log-step lines into ONE progress line per stage: rewritten in place on a
    terminal, printed once at the end of the stage otherwise (CI logs)."""

    def __init__(self, stage: str):
        super().__init__(logging.INFO)
        self.stage, self.last, self.tty = stage, "", sys.stdout.isatty()

    def emit(self, record):
        if not record.msg.startswith("step "):
            return
        step, total, shown, rates, eta = record.args
        keep = [kv for kv in shown.split() if kv.split("=")[0] in ("loss", "visual_loss", "text_loss", "psnr")]
        self.last = f"    {self.stage}: step {step}/{total} {' '.join(keep)}{rates}{eta}"
        if self.tty:
            print("\r" + self.last.ljust(120), end="", flush=True)

    def close_line(self):
        if self.last:
            print(("\r" + self.last.ljust(120)) if self.tty else self.last, flush=True)
        super().close()


def _train(cfg, run_dir: str, stage: str, devices=None):
    from unifluid_jax.train import trainer
    handler = _ProgressLine(stage)
    logger = logging.getLogger("unifluid_jax.train.metrics")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False  # the stage's line replaces the per-step log lines
    try:
        trainer.Trainer(cfg, run_dir, devices=devices).run()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close_line()


def _finished(run_dir: str, steps: int) -> bool:
    """A training stage is done when its final checkpoint and summary exist (re-running it would only
    rewrite the summary)."""
    return (os.path.isdir(os.path.join(run_dir, "checkpoints", str(steps)))
            and os.path.exists(os.path.join(run_dir, "metrics_summary.json")))


def _stage(label: str, title: str, run_dir: str, config: str, arg: str, seed: int, steps: int,
           devices=None) -> dict:
    """One encoder stage (configs/CONFIG.py:ARG, trained unless finished); returns its stats file."""
    from unifluid_jax import config as config_lib
    cfg = _load_config(config, f"{arg},steps={steps}")
    cfg.seed = seed
    config_lib.validate(cfg)
    if not _finished(run_dir, steps):
        _log(f"{title} for {steps} steps -> {run_dir}")
        _train(cfg, run_dir, label, devices)
    with open(os.path.join(run_dir, f"{cfg.task}_stats.json")) as f:
        return {k: v for k, v in json.load(f).items() if k != "history"}


def prepare(workdir: str, p: dict, seed: int, devices=None) -> tuple[str, dict]:
    """Stages 1-3 (dataset, VAE, SigLIP) in `workdir`; returns (data_dir, stats): stats['vae'] and, when the
    preset trains one, stats['siglip'] (the runs are WORKDIR/vae and WORKDIR/siglip)."""
    from unifluid_jax.tools import build_shapes
    data_dir = os.path.join(workdir, "shapes")
    if not os.path.exists(os.path.join(data_dir, "metadata.json")):
        _log(f"1/5 building the shapes dataset ({p['num_train']} scenes x 4 tasks, seed {seed}) in {data_dir}")
        build_shapes.build(data_dir, size=64, num_train=p["num_train"], num_val=256, num_test=256, seed=seed,
                           num_geneval=p["num_eval"], geneval_fraction=p["geneval_fraction"])
    stats = {"vae": _stage("VAE", "2/5 training the VAE", os.path.join(workdir, "vae"), "vae_tiny",
                           f"data={data_dir}", seed, p["vae_steps"], devices)}
    if p["siglip_steps"]:
        # The understanding half reads a SigLIP image tower trained here with the sigmoid image-text loss on the
        # caption pairs (a random frozen tower leaves captions and answers to guesswork; see the README).
        stats["siglip"] = _stage("SigLIP", "3/5 training SigLIP (sigmoid loss, caption pairs)",
                                 os.path.join(workdir, "siglip"), "siglip_tiny", f"data={data_dir},batch=128", seed,
                                 p["siglip_steps"], devices)
    return data_dir, stats


def train_unifluid(run_dir: str, p: dict, seed: int, data_dir: str, stats: dict, extra_arg: str = "",
                   devices=None):
    """Stage 4: UniFluid with the preset's recipe (+ `extra_arg`, later keys win); returns its config."""
    from unifluid_jax import config as config_lib
    prep = os.path.dirname(data_dir)  # where prepare() put the VAE and SigLIP runs
    siglip = os.path.join(prep, "siglip") if "siglip" in stats else ""
    arg = (f"data={data_dir},vae={os.path.join(prep, 'vae')},siglip={siglip},steps={p['steps']},"
           f"scaling={stats['vae']['scaling_factor']},seed={seed},{p['unifluid']}"
           + (f",{extra_arg}" if extra_arg else ""))
    cfg = _load_config("unifluid_demo", arg)
    config_lib.validate(cfg)
    if not _finished(run_dir, p["steps"]):
        _log(f"4/5 training UniFluid for {p['steps']} steps (VAE frozen) -> {run_dir}")
        _train(cfg, run_dir, "UniFluid", devices)
    return cfg


def evaluate(eval_dir: str, p: dict, seed: int, cfg, run_dir: str, data_dir: str) -> dict:
    """Stage 5: the eval suite on the run's serving params (cached in eval_dir for the run's last step)."""
    import jax

    from unifluid_jax.evals import suite
    from unifluid_jax.models import unifluid
    from unifluid_jax.train import checkpoint as ckpt_lib
    results_path = os.path.join(eval_dir, "eval_results.json")
    if os.path.exists(results_path) and json.load(open(results_path)).get("step") == p["steps"]:
        return json.load(open(results_path))
    _log(f"5/5 evaluating -> {eval_dir}")
    model_cfg = unifluid.config_from_dict(cfg.model)
    params = ckpt_lib.serving_params(ckpt_lib.load_numpy(run_dir))
    n = 6 * p["num_eval"]
    tasks = {s["path"].rstrip("/").split("/")[-1] for s in cfg.data.sources}
    variables = {"params": jax.tree.map(jax.numpy.asarray, params)}
    results = suite.evaluate(unifluid.UniFluid(model_cfg), variables, data_dir, out_dir=eval_dir,
                             num_geneval=n if "t2i" in tasks else 0,
                             num_caption=n if "caption" in tasks else 0, num_vqa=n if "vqa" in tasks else 0,
                             num_steps=p["num_sample_steps"], cfg_scale=p["cfg_scale"],
                             cfg_schedule=p["cfg_schedule"], temperature=p["temperature"], seed=seed)
    results["step"] = p["steps"]
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1, default=float)
    return results


def run(workdir: str, *, preset: str = "short", seed: int = 0, devices=None, **overrides) -> dict:
    """Runs (or resumes) the demo; `overrides` replace preset entries (tests use small values); `devices`
    (default: all) are the training stages' mesh."""
    p = {**PRESETS[preset], **overrides}
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()
    data_dir, stats = prepare(workdir, p, seed, devices)
    times["data+vae+siglip"] = time.perf_counter() - t
    t = time.perf_counter()
    uf_dir = os.path.join(workdir, "unifluid")
    cfg = train_unifluid(uf_dir, p, seed, data_dir, stats, devices=devices)
    with open(os.path.join(uf_dir, "metrics_summary.json")) as f:
        train_summary = json.load(f)
    times["unifluid"] = time.perf_counter() - t
    t = time.perf_counter()
    results = evaluate(os.path.join(workdir, "eval"), p, seed, cfg, uf_dir, data_dir)
    times["eval"] = time.perf_counter() - t

    metrics = train_summary.get("metrics", {})
    summary = {"preset": preset, "seed": seed, "recipe": p, **stats,
               "unifluid_train": {k: metrics[k]["mean_last10"] for k in sorted(metrics) if k.startswith("train/")},
               "loss_curve_first_last": [train_summary.get("loss_curve", [])[:1],
                                         train_summary.get("loss_curve", [])[-1:]],
               "eval": results, "seconds": times}
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    _print_summary(summary, workdir)
    return summary


def _print_summary(s: dict, workdir: str) -> None:
    e = s["eval"]
    lines = [f"VAE PSNR (held-out): {s['vae']['psnr_init']:.2f} -> {s['vae']['psnr']:.2f} dB"]
    if "siglip" in s:
        g = s["siglip"]
        lines.append(f"SigLIP held-out retrieval top-1: image->text {g['i2t_top1']:.2f}, text->image "
                     f"{g['t2i_top1']:.2f} [chance {g['chance_top1']:.3f}]")
    lines += [
             "UniFluid train (mean of last logs): " + ", ".join(
                 f"{k.split('/')[-1]}={v:.4g}" for k, v in s["unifluid_train"].items()
                 if k.split("/")[-1] in ("loss", "visual_loss", "text_loss", "caption_token_acc", "vqa_token_acc"))]
    if "geneval" in e:
        ch = e.get("geneval_chance", {})
        lines.append("shapes-GenEval (chance in brackets): " + ", ".join(
            f"{k}={v:.2f} [{ch.get(k, float('nan')):.2f}]" for k, v in e["geneval"].items() if isinstance(v, float)))
        if "geneval_vae_ceiling" in e:
            lines.append(f"  (the VAE's ceiling: drawn scenes through the VAE score "
                         f"{e['geneval_vae_ceiling']['overall']:.2f} overall)")
        lines.append(f"FD (shapes features, not Inception): {e['fd_shapes_features']:.3f}")
    if "caption" in e:
        c = e["caption"]
        lines.append(f"captions: exact={c['exact_match']:.2f} [{c['chance']['exact_match']:.2f}] "
                     f"CIDEr-D={c['cider']:.3f} [{c['chance']['cider']:.3f}]")
    if "vqa" in e:
        v = e["vqa"]
        lines.append(f"VQA: exact={v['exact_match']:.2f} [{v['chance']['exact_match']:.2f}] "
                     f"soft={v['soft_accuracy']:.2f}")
    lines.append("time (s): " + ", ".join(f"{k}={v:.0f}" for k, v in s["seconds"].items()))
    lines.append(f"samples: {os.path.join(workdir, 'eval', 'samples.png')}; all numbers: "
                 f"{os.path.join(workdir, 'demo_summary.json')}")
    print("\n".join(["", "=== UniFluid demo ==="] + lines), flush=True)


def main(argv):
    del argv
    # One line per stage: orbax/grain notices and the trainer's own info lines stay out; warnings and errors
    # (something is wrong) still show.
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("unifluid_jax").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Matrix is singular")  # FD on a handful of quick-run samples
    run(FLAGS.workdir, preset="quick" if FLAGS.quick else FLAGS.preset, seed=FLAGS.seed)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
