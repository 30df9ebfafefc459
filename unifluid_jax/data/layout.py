"""Re-export of unifluid_jax.layout, the data/model contract's home (kept for existing imports)."""
from unifluid_jax.layout import *  # noqa: F401,F403
