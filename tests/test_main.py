"""The entry point: bad overrides give one clear error (exit 2) before anything compiles or is written."""
import pytest

from unifluid_jax import config as config_lib
from unifluid_jax import main
from tests.train import runner

CASES = [
    ("--config.optimizer.lr=-1", "ConfigError: config.optimizer.lr: must be >= 0, got -1.0"),
    ("--config.optimizer.lrr=1", 'unknown config key in --config.optimizer.lrr=1 (Did you mean "lr"'),
    ("--config.mesh.data=3", "ConfigError: config.mesh: {'data': 3, 'fsdp': -1, 'tensor': 1} cannot fill 8"),
    ("--config.gemma.num_kv_heads=3", "ConfigError: config.gemma.num_kv_heads: num_heads (4) must be divisible"),
    ("--mode=bogus", "ConfigError: --mode='bogus' is unknown; choose one of ['caption', 'edit', 'eval', 'sample', 'train', 'vqa']"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_bad_override_exits_2_before_compile(tmp_path, override, message):
    r = runner.run_main("configs/lm_tiny.py", tmp_path / "run", override, devices=8, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing compiled


def test_modes_dispatch_by_name():
    assert main.resolve_mode("train").__name__ == "train"
    main.MODES["probe"] = "unifluid_jax.config:defaults"
    try:
        assert main.resolve_mode("probe") is config_lib.defaults
    finally:
        del main.MODES["probe"]
    with pytest.raises(config_lib.ConfigError, match="unknown"):
        main.resolve_mode("nope")
