"""unifluid_jax: UniFluid (unified autoregressive visual generation and understanding) in JAX/Flax."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent
_REQUIREMENTS = [
    line.split("#")[0].strip()
    for line in (_HERE / "requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip()
]
# Test-only references. torch must be installed first as `torch==2.13.0` (the CPU build); the Makefile
# does that, because a bare `torch` requirement resolves to a multi-GB CUDA build.
_TEST = [
    "torch==2.13.0",
    "transformers==5.23.0",
    "diffusers==0.42.1",
    "safetensors==0.8.0",
    "pycocoevalcap==1.2",
    # The FID references (pytorch-fid==0.3.0, clean-fid==0.1.35) are NOT here: they require torchvision, whose
    # PyPI wheels are CUDA builds that break `import transformers` next to the CPU torch. The Makefile installs
    # them with --no-deps and torchvision==0.28.0 into .venv/fid_refs (tests/evals/fid_refs.py puts it on sys.path).
    "pytest==9.2.0",
    "pytest-xdist==3.8.0",
]

# Web-scale ingestion (unifluid_jax/tools/ingest.py). 2.71.0 is the newest Apache Beam whose pins resolve
# with requirements.txt (pip backtracks past 2.72-2.77; 2.77 requires pillow < 13, we pin 13.0.0). It brings
# protobuf 6.33 and pyarrow 18 (requirements.txt pins neither); checked with `pip install --dry-run
# -r requirements.txt apache-beam==2.71.0` and `pip check` in a fresh venv. Cluster runners need their own
# extras, e.g. apache-beam[gcp]==2.71.0 for Dataflow.
_BEAM = ["apache-beam==2.71.0"]

# The PyTorch port (unifluid_jax/torch_port/, runs an exported folder without JAX). As for the tests, install
# the CPU build of torch first (`pip install torch==2.13.0`; the bare requirement resolves to a CUDA build).
_TORCH = ["torch==2.13.0", "transformers==5.23.0", "diffusers==0.42.1", "safetensors==0.8.0"]

setuptools.setup(
    name="unifluid_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["unifluid_jax", "unifluid_jax.*"]),
    install_requires=_REQUIREMENTS,
    extras_require={"test": _TEST, "beam": _BEAM, "torch": _TORCH},
)
