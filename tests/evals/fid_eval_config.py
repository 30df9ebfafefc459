"""configs/unifluid_tiny.py plus a `fid_eval` section (evals/coco.py SETTINGS), so subprocess tests can set
--config.fid_eval.* on the command line. Arg: as unifluid_tiny's."""
import pathlib
import importlib.util

from unifluid_jax.evals import coco


def get_config(arg=None):
    path = pathlib.Path(__file__).resolve().parents[2] / "configs" / "unifluid_tiny.py"
    spec = importlib.util.spec_from_file_location("_unifluid_tiny", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(arg)
    c.fid_eval = dict(coco.SETTINGS)
    return c
