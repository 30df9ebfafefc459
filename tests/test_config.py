"""config.validate: every bad value gives one ConfigError naming the field, before anything compiles."""
import pytest

from unifluid_jax import config as config_lib
from tests.train import runner


def _cfg():
    return runner.load_config("configs/lm_tiny.py", "")


def _set(c, path, value):
    *head, last = path.split(".")
    for h in head:
        c = c[h]
    with c.ignore_type():
        c[last] = value


def test_lm_tiny_is_valid():
    config_lib.validate(_cfg(), num_devices=8)


BAD = [
    ("optimizer.lr", -1.0, r"config\.optimizer\.lr: must be >= 0"),
    ("optimizer.schedule", "linear", r"config\.optimizer\.schedule: unknown value 'linear'"),
    ("optimizer.b2", 1.5, r"config\.optimizer\.b1/b2"),
    ("optimizer.frozen_regexes", ("([",), r"config\.optimizer\.frozen_regexes: bad regex"),
    ("optimizer.grad_accum_steps", 3, r"config\.optimizer\.grad_accum_steps: 3 must divide"),
    ("task", "nope", r"config\.task: unknown task 'nope'"),
    ("train.num_steps", -5, r"config\.train\.num_steps: must be > 0"),
    ("train.batch_size", 12, r"config\.train\.batch_size: 12 must be divisible by mesh data\*fsdp = 8"),
    ("mesh", {"data": 3, "fsdp": -1, "tensor": 1}, r"config\.mesh: .* cannot fill 8 devices"),
    ("mesh", {"data": 2, "fsdp": 2, "tensor": 1}, r"config\.mesh: .* uses 4 devices but 8 are available"),
    ("mesh", {"data": -1, "fsdp": -1, "tensor": 1}, r"config\.mesh: at most one axis may be -1"),
    ("mesh", {"data": 1, "fsdp": -1, "pipeline": 1}, r"config\.mesh\.pipeline: unknown mesh axis"),
    ("checkpoint.init_from", "/no/such/run", r"config\.checkpoint\.init_from: no such directory"),
    ("checkpoint.max_to_keep", 0, r"config\.checkpoint\.max_to_keep"),
    ("distributed.mode", "maybe", r"config\.distributed\.mode: unknown value"),
    ("sharding.check_large_params", "loud", r"config\.sharding\.check_large_params"),
    ("data.min_len", 9, r"config\.data\.min_len: must be <= data\.max_len"),
    ("data.ops", ("copy", "add"), r"config\.data\.ops"),
    # Gemma model section (models/gemma.py validate_config)
    ("gemma.variant", "gemma3_1b", r"config\.gemma\.variant: unknown Gemma variant"),
    ("gemma.num_kv_heads", 3, r"config\.gemma\.num_kv_heads: num_heads \(4\) must be divisible by num_kv_heads"),
    ("gemma.sliding_window", 0, r"config\.gemma\.sliding_window: must be None or an int >= 1"),
    ("gemma.width", -32, r"config\.gemma\.width: must be a positive int"),
    ("gemma.head_dim", 7, r"config\.gemma\.head_dim: RoPE needs an even head_dim"),
    ("gemma.num_layers", 3, r"config\.gemma\.num_layers: .* must be even"),
    ("gemma.dtype", "float8", r"config\.gemma\.dtype: unknown dtype"),
    ("gemma.remat_policy", "sometimes", r"config\.gemma\.remat_policy: unknown value"),
    ("gemma.vocab_size", 16, r"config\.gemma\.vocab_size: the toy task needs >= 17 tokens"),
]


@pytest.mark.parametrize("path,value,message", BAD, ids=[f"{p}={v}" for p, v, _ in BAD])
def test_bad_values_raise_one_clear_error(path, value, message):
    c = _cfg()
    _set(c, path, value)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate(c, num_devices=8)


def test_unknown_gemma_field():
    c = _cfg()
    c.gemma.heads = 4
    with pytest.raises(config_lib.ConfigError, match=r"config\.gemma\.heads: unknown Gemma field"):
        config_lib.validate(c, num_devices=8)


def test_missing_section():
    c = _cfg()
    del c["checkpoint"]
    with pytest.raises(config_lib.ConfigError, match=r"config\.checkpoint: missing section"):
        config_lib.validate(c, num_devices=8)
