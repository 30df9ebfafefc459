"""The entry point: bad overrides give one clear error (exit 2) before anything compiles or is written."""
import pathlib

import pytest

from unifluid_jax import config as config_lib
from unifluid_jax import main
from tests.train import runner

CASES = [
    ("--config.optimizer.lr=-1", "ConfigError: config.optimizer.lr: must be >= 0, got -1.0"),
    ("--config.optimizer.lrr=1", 'unknown config key in --config.optimizer.lrr=1 (Did you mean "lr"'),
    ("--config.mesh.data=3", "ConfigError: config.mesh: {'data': 3, 'fsdp': -1, 'tensor': 1} cannot fill 8"),
    ("--config.gemma.num_kv_heads=3", "ConfigError: config.gemma.num_kv_heads: num_heads (4) must be divisible"),
    ("--mode=bogus", f"ConfigError: --mode='bogus' is unknown; choose one of {sorted(main.MODES)}"),
    ("--config.train.batch_size=abc", "ConfigError: flag --config.train.batch_size=abc: invalid literal for int()"),
    ("--config.train.batch_size=1.5", "ConfigError: flag --config.train.batch_size=1.5: invalid literal for int()"),
    ("--config.train.batch_size", "ConfigError: Missing value for flag --config.train.batch_size"),
]


@pytest.mark.parametrize("override,message", CASES, ids=[c[0] for c in CASES])
def test_bad_override_exits_2_before_compile(tmp_path, override, message):
    r = runner.run_main("configs/lm_tiny.py", tmp_path / "run", override, devices=8, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written, nothing compiled


def _one_line_exit_2(r, message):
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [message] or message in r.stderr.strip().splitlines()[-1], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_config_file_exits_2(tmp_path):
    r = runner.run_main("configs/nope.py", tmp_path / "run", timeout=60)
    _one_line_exit_2(r, "the config file cannot be loaded (no such file)")
    assert not (tmp_path / "run").exists()


def test_workdir_file_or_unwritable_exits_2(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    for workdir, why in ((f, f"{f} is a file, not a directory"), (f / "sub", f"{f} is a file, not a directory"),
                         ("/proc/1/run", "/proc/1 is not writable")):
        r = runner.run_main("configs/lm_tiny.py", workdir, devices=8, timeout=120)
        _one_line_exit_2(r, f"ConfigError: --workdir={workdir}: {why}")
    assert f.read_text() == "x"


def _unifluid(dataset):
    return runner.load_config("configs/unifluid_tiny.py", f"data={dataset}")


def _fake_dataset(root, tokenizer=True):
    """Shard files where the config looks for them (only their names are checked before the run)."""
    for s in _unifluid(root).data.sources:
        d = pathlib.Path(s["path"])
        d.mkdir(parents=True, exist_ok=True)
        (d / "part-00000-of-00001.array_record").write_bytes(b"")
    if tokenizer:
        (root / "tokenizer.model").write_bytes(b"")


def test_missing_data_and_tokenizer_are_config_errors_before_anything_is_written(tmp_path):
    (tmp_path / "empty" / "train" / "t2i").mkdir(parents=True)
    _fake_dataset(tmp_path / "notok", tokenizer=False)
    cases = [(tmp_path / "missing", r"config\.data\.sources\[0\]\.path: '.*missing/train/t2i': no such file, "
                                    r"directory or shard prefix; point it at a dataset"),
             (tmp_path / "empty", r"config\.data\.sources\[0\]\.path: '.*empty/train/t2i': the directory holds "
                                  r"no \*\.array_record shards"),
             (tmp_path / "notok", r"config\.data\.tokenizer: no such file '.*notok/tokenizer\.model'")]
    for dataset, message in cases:
        with pytest.raises(config_lib.ConfigError, match=message):
            main.run(_unifluid(dataset), str(tmp_path / "run"))
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_missing_data_exits_2_without_leaving_a_workdir(tmp_path):
    r = runner.run_main(f"configs/unifluid_tiny.py:data={tmp_path / 'nodata'}", tmp_path / "run", devices=8,
                        timeout=300)
    _one_line_exit_2(r, "ConfigError: config.data.sources[0].path:")
    assert not (tmp_path / "run").exists()


def test_modes_dispatch_by_name():
    assert main.resolve_mode("train").__name__ == "train"
    main.MODES["probe"] = "unifluid_jax.config:defaults"
    try:
        assert main.resolve_mode("probe") is config_lib.defaults
    finally:
        del main.MODES["probe"]
    with pytest.raises(config_lib.ConfigError, match="unknown"):
        main.resolve_mode("nope")
