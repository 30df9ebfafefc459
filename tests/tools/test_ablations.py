"""The ablation grid and its tables (the runs themselves are the demo's stages, tested in test_demo.py)."""
import numpy as np

from unifluid_jax.tools import ablations, demo


def test_grid_rows_parse_as_demo_config_args(tmp_path):
    grid = demo._load_config("ablations", "")
    for row in {r for rows in grid.tables.values() for r in rows}:
        assert row in grid.rows, row
    p = demo.PRESETS["quick"]
    for row, arg in grid.rows.items():
        cfg = demo._load_config("unifluid_demo", f"data={tmp_path},{p['unifluid']},{arg}")
        assert cfg.model.text_weight == float(arg.split("text_weight=")[1].split(",")[0]), row
    t2i_only = demo._load_config("unifluid_demo", f"data={tmp_path},{p['unifluid']},{grid.rows['t2i_only']}")
    assert [s["path"].split("/")[-1] for s in t2i_only.data.sources] == ["t2i"]


def test_tables_mean_and_spread_over_seeds():
    out = {"steps": 10, "seeds": [0, 1], "wall_seconds": 3600,
           "rows": {"a": {"0": {"GenEval": 0.2, "VQA": 0.5, "caption EM": np.nan},
                          "1": {"GenEval": 0.4, "VQA": 0.7, "caption EM": np.nan}}}}
    md = ablations.tables(out, {"T": ["a", "b"]})
    assert "| a | 0.300 ± 0.100 | 0.600 ± 0.100 | - |" in md
    assert "| b | - | - | - |" in md and "1.00 h wall" in md
