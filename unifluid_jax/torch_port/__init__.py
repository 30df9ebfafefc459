"""PyTorch port of UniFluid (`pip install -e .[torch]`; imports nothing from JAX).

    from unifluid_jax.torch_port import UniFluidTorch
    m = UniFluidTorch.from_folder(EXPORT_DIR)       # written by `python -m unifluid_jax.main --mode=export`
    images, tokens = m.generate(["a red circle"], cfg_scale=3.0, num_steps=100, order="raster", seed=0)
    captions = m.caption(images_und, method="beam", beam_size=2)
    answers = m.answer(images_und, ["what colour is the circle?"])
"""
from unifluid_jax.torch_port.model import UniFluidTorch  # noqa: F401
