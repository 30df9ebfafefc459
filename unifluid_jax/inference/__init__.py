"""Inference for the unified model: image generation / editing (generate.py) and text decoding (decode.py)."""
from unifluid_jax.inference.decode import (beam_search, decode_text, detokenize, question_batch,  # noqa: F401
                                           sample_loop)
from unifluid_jax.inference.generate import generate_images, prompt_batch, to_uint8  # noqa: F401
