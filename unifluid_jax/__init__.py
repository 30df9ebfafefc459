"""unifluid_jax: UniFluid in JAX/Flax (Gemma-2 backbone, SigLIP, KL-VAE, per-token diffusion head)."""
__version__ = "0.1.0"
