"""The paper's ablations at demo scale (`make ablations`): configs/ablations.py's rows x seeds, then tables.

    python -m unifluid_jax.tools.ablations --workdir=workdir/ablations [--seeds=0,1] [--steps=N]

Per seed: one shapes dataset, one VAE and one SigLIP (tools/demo.py stages 1-3), shared by the rows; per row: UniFluid
with the demo recipe plus the row's overrides, then the eval suite. Resumable like the demo (finished runs and
evals are reused). Writes WORKDIR/ablations.json (every number) and WORKDIR/ablations.md (the tables: mean and
spread over seeds of shapes-GenEval, VQA exact match and caption exact match, each with the paper's direction).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from unifluid_jax.tools import demo

FLAGS = flags.FLAGS
METRICS = (("GenEval", ("geneval", "overall")), ("VQA", ("vqa", "exact_match")),
           ("caption EM", ("caption", "exact_match")))


def _get(results: dict, path) -> float:
    cur = results
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return float("nan")
        cur = cur[k]
    return float(cur)


def run(workdir: str, grid, seeds=None, steps: int = 0) -> dict:
    p = dict(demo.PRESETS[grid.preset])
    if steps or grid.steps:
        p["steps"] = steps or grid.steps
    workdir = os.path.abspath(workdir)
    seeds = list(seeds if seeds is not None else grid.seeds)
    out = {"preset": grid.preset, "steps": p["steps"], "seeds": seeds, "rows": {}}
    t0 = time.time()
    for seed in seeds:
        sdir = os.path.join(workdir, f"seed{seed}")
        os.makedirs(sdir, exist_ok=True)
        data_dir, stats = demo.prepare(sdir, p, seed)
        for row, arg in grid.rows.items():
            run_dir = os.path.join(sdir, row)
            demo._log(f"ablation {row} seed {seed}: {arg}")
            cfg = demo.train_unifluid(run_dir, p, seed, data_dir, stats, extra_arg=arg)
            res = demo.evaluate(os.path.join(run_dir, "eval"), p, seed, cfg, run_dir, data_dir)
            out["rows"].setdefault(row, {})[str(seed)] = {name: _get(res, path) for name, path in METRICS}
    out["wall_seconds"] = time.time() - t0
    with open(os.path.join(workdir, "ablations.json"), "w") as f:
        json.dump(out, f, indent=1)
    md = tables(out, grid.tables)
    with open(os.path.join(workdir, "ablations.md"), "w") as f:
        f.write(md)
    print(md, flush=True)
    return out


def tables(out: dict, table_rows) -> str:
    """Markdown tables: per row, mean +- half the range over seeds, for each metric."""
    lines = [f"Ablations at demo scale ({out['steps']} steps, seeds {out['seeds']}, "
             f"{out.get('wall_seconds', 0) / 3600:.2f} h wall)", ""]
    for title, rows in table_rows.items():
        lines += [f"### {title}", "", "| row | " + " | ".join(m for m, _ in METRICS) + " |",
                  "|---|" + "---|" * len(METRICS)]
        for row in rows:
            cells = []
            for name, _ in METRICS:
                vals = np.array([v[name] for v in out["rows"].get(row, {}).values()], float)
                vals = vals[~np.isnan(vals)]
                cells.append("-" if not len(vals) else
                             f"{vals.mean():.3f} ± {(vals.max() - vals.min()) / 2:.3f}")
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _define_flags():
    flags.DEFINE_string("workdir", "workdir/ablations", "output directory")
    flags.DEFINE_list("seeds", None, "seeds (default: configs/ablations.py)")
    flags.DEFINE_integer("steps", 0, "UniFluid steps per run (0: the demo preset's)")


def main(argv):
    del argv
    import logging
    import warnings

    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("unifluid_jax").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    grid = demo._load_config("ablations", "")
    run(FLAGS.workdir, grid, [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None, FLAGS.steps)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
