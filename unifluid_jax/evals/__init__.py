"""Evaluation suite: analytic shapes detector, shapes-GenEval, CIDEr-D, VQA accuracy, Frechet distance,
editing success. Submodules are imported explicitly (`from unifluid_jax.evals import geneval`)."""
