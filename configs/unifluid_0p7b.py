"""UniFluid 0.7B (paper ablation size; the backbone's exact shape is OPEN in the paper, see configs/common.py)."""
from configs import unifluid_2b


def get_config(arg=None):
    return unifluid_2b.get_config("size=0p7b," + (arg or ""))
