"""The paper's ablations at demo scale (`make ablations`, tools/ablations.py): one knob changed per row.

Each row trains the demo's UniFluid (configs/unifluid_demo.py, the `short` demo recipe) with the row's
overrides, for every seed, on that seed's shapes dataset and VAE (shared by the rows), then evaluates
shapes-GenEval, VQA and captions. `get_config()` returns the grid; the tables it prints mirror the paper's:

  Table 3, lambda (text-loss weight): 0.005 / 0.1 / 1.0 -> understanding improves, generation degrades as
           lambda grows (paper, 0.7B: FID 8.39 / 17.90 / 47.89).
  Table 4, image-token order: random -> raster annealing vs raster only (paper, 2B: FID 7.20 vs 8.28).
  Tables 1-2, unified vs t2i-only vs understanding-only (paper: unified generation is better, FID 7.20 vs
           7.88; understanding close to the understanding-only model).
"""
import ml_collections

# Overrides in configs/unifluid_demo.py's arg syntax, applied on top of the demo recipe's arg string.
ROWS = {
    "lambda_0005": "text_weight=0.005",
    "lambda_01": "text_weight=0.1",
    "lambda_1": "text_weight=1.0",
    "order_annealed": "text_weight=0.1,order=annealed",
    "t2i_only": "text_weight=0.1,mix=t2i:1",
    "und_only": "text_weight=0.1,mix=caption:1/vqa:1",
}

# table name -> (rows in order, the paper's direction as a predicate on {row: metrics})
TABLES = {
    "Table 3: lambda": ["lambda_0005", "lambda_01", "lambda_1"],
    "Table 4: order (raster row = lambda_01)": ["order_annealed", "lambda_01"],
    "Tables 1-2: unified vs single-task (unified row = lambda_01)": ["lambda_01", "t2i_only", "und_only"],
}


def get_config(arg=None):
    del arg
    c = ml_collections.ConfigDict()
    c.rows = dict(ROWS)
    c.tables = {k: list(v) for k, v in TABLES.items()}
    c.seeds = (0, 1)
    c.preset = "short"  # the demo recipe every row starts from (tools/demo.py PRESETS)
    c.steps = 0         # 0: the preset's UniFluid steps
    return c
