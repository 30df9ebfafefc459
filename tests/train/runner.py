"""Helpers to run `python -m unifluid_jax.main` in subprocesses with their own fake device count."""
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]


def env_for(devices: int, **extra) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT)
    # Subprocesses of the same config compile the same programs: share XLA executables between them.
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"unifluid_jax_tests_xla_{os.getuid()}")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def main_cmd(config: str, workdir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "unifluid_jax.main", f"--config={ROOT / config}", f"--workdir={workdir}",
            *overrides]


def run_main(config: str, workdir, *overrides: str, devices: int = 1, timeout: float = 400, **env):
    """Runs to completion; returns CompletedProcess (stdout/stderr as text)."""
    return subprocess.run(main_cmd(config, workdir, *overrides), cwd=ROOT, env=env_for(devices, **env),
                          capture_output=True, text=True, timeout=timeout)


def start_main(config: str, workdir, *overrides: str, devices: int = 1, log=None, **env) -> subprocess.Popen:
    return subprocess.Popen(main_cmd(config, workdir, *overrides), cwd=ROOT, env=env_for(devices, **env),
                            stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)


def fingerprints(workdir, process: int = 0) -> dict[int, str]:
    """step -> fingerprint; a step re-run after a resume must repeat the same batch (asserted here)."""
    out = {}
    path = pathlib.Path(workdir) / f"batch_fingerprints.p{process}.txt"
    for line in path.read_text().splitlines():
        step, fp = line.split()
        step = int(step)
        assert out.get(step, fp) == fp, f"step {step} consumed a different batch after resume"
        out[step] = fp
    return out


def load_config(path: str, arg: str | None = None):
    """configs/<name>.py -> get_config(arg), as config_flags would load it."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_cfg_" + pathlib.Path(path).stem, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg is not None else mod.get_config()
