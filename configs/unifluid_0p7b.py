"""UniFluid 0.7B (paper ablation size; the backbone's exact shape is OPEN in the paper, see
unifluid_jax/presets.py). Same recipe and config args as configs/unifluid_2b.py, including the published starting
weights siglip=PATH and vae=PATH[,vae_format=...]; there is no published Gemma of this shape, so gemma= only
takes a checkpoint of the same stack (e.g. gemma=RUN,gemma_format=project... of an earlier 0.7B run)."""
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("unifluid_2b", pathlib.Path(__file__).with_name("unifluid_2b.py"))
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config(arg=None):
    return _base.get_config("size=0p7b," + (arg or ""))
