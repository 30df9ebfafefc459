"""UniFluid 0.7B (paper ablation size; the backbone's exact shape is OPEN in the paper, see
unifluid_jax/presets.py). Same recipe as configs/unifluid_2b.py."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("unifluid_2b", pathlib.Path(__file__).with_name("unifluid_2b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    return _base.get_config("size=0p7b," + (arg or ""))
