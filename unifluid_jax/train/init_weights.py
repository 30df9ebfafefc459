"""Start a run from published weights: `checkpoint.init_subtrees` entries in any supported format.

Each entry is a dict: `dst` (the param subtree to fill, e.g. 'llm', 'siglip', 'vae'), `format`, and `path`
(local or gs://; `workdir` is the same field for format 'project'):

    format      dst          reads (converter)
    project     any          another run of this project (its params, `src` picks a subtree of them)
    hf          llm          transformers Gemma / Gemma-2 save_pretrained folder (convert/gemma.py)
    hf          siglip       transformers SigLIP / SiglipVision / PaliGemma folder (convert/siglip.py)
    flax        llm          official Flax Gemma checkpoint (orbax folder; convert/gemma.py)
    big_vision  llm, siglip  big_vision .npz (PaliGemma: params/llm/..., params/img/...)
    diffusers   vae          diffusers AutoencoderKL folder (the `vae/` of a pipeline; convert/vae.py)
    ldm         vae          original LDM / SD .ckpt / .safetensors (convert/vae.py)

The component config (model.llm / model.siglip / model.vae) tells the converter what to expect; every tensor
is checked against the run's abstract params (one error naming the tensor and both shapes) and placed
straight into the run's shardings: each device receives only its own shard (`make_array_from_callback`).
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging

import jax
import numpy as np
from etils import epath
from flax import traverse_util

from unifluid_jax.checks import ConfigError, check, check_tree_shapes

log = logging.getLogger(__name__)

FORMATS = {"project": None, "hf": ("llm", "siglip"), "flax": ("llm",), "big_vision": ("llm", "siglip"),
           "diffusers": ("vae",), "ldm": ("vae",)}
_KEYS = {"workdir", "path", "format", "src", "dst"}


def entry_path(sub) -> str:
    return sub.get("path") or sub.get("workdir") or ""


def validate_entries(subs, path: str = "checkpoint.init_subtrees") -> None:
    """One ConfigError for the first malformed entry (unknown key/format, wrong dst, missing path)."""
    for i, sub in enumerate(subs or ()):
        where = f"{path}[{i}]"
        check(set(sub) <= _KEYS and "dst" in sub, where,
              f"expected dict(dst='llm', format='hf', path=DIR) or dict(workdir=RUN_DIR, dst='sub/tree', src=''), "
              f"got {dict(sub)}")
        fmt = sub.get("format", "project") or "project"
        check(fmt in FORMATS, f"{where}.format", f"{fmt!r} is unknown; choose one of {sorted(FORMATS)}")
        allowed = FORMATS[fmt]
        check(allowed is None or sub["dst"] in allowed, f"{where}.dst",
              f"format {fmt!r} fills {' or '.join(allowed or ())}, not {sub['dst']!r}")
        p, key = entry_path(sub), "path" if sub.get("path") else "workdir"
        check(not p or epath.Path(p).exists(), f"{where}.{key}", f"no such file or directory {p!r}")


# --- converters ------------------------------------------------------------------------------------------------

def _component_config(model_section, dst: str):
    from unifluid_jax.models import unifluid
    cfg = unifluid.config_from_dict(model_section)
    return {"llm": cfg.llm, "siglip": cfg.siglip, "vae": cfg.vae}[dst]


def _read_orbax(path: str) -> dict:
    import orbax.checkpoint as ocp
    return ocp.PyTreeCheckpointer().restore(str(path))


def _read_npz(path: str) -> dict:
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def convert(fmt: str, dst: str, path: str, model_section) -> dict:
    """Host params of one component in the project layout, from a published checkpoint."""
    from unifluid_jax.convert import gemma, siglip, vae
    cfg = _component_config(model_section, dst)
    if cfg is None:
        raise ConfigError(f"checkpoint.init_subtrees: dst {dst!r} but the model has no {dst} (model.{dst} is empty)")
    if dst == "llm":
        if fmt == "hf":
            return gemma.load_hf_checkpoint(path, cfg)
        if fmt == "flax":
            return gemma.params_from_flax(_read_orbax(path), cfg)
        flat = _read_npz(path)
        if any("llm/" in k for k in flat):  # a PaliGemma file: only its language model
            flat = {k[k.index("llm/"):]: v for k, v in flat.items() if "llm/" in k}
        return gemma.params_from_big_vision(flat, cfg)
    if dst == "siglip":
        out = siglip.load_hf(path, cfg)[1] if fmt == "hf" else siglip.from_big_vision(_read_npz(path), cfg)
        return out["params"]
    out = vae.load_diffusers(path, cfg)[1] if fmt == "diffusers" else vae.load_ldm_checkpoint(path, cfg)
    return out["params"]


def place(host, abstract, what: str):
    """Host tree -> arrays in the shardings of `abstract` (ShapeDtypeStructs with .sharding); the first
    missing or mis-shaped tensor raises naming it and both shapes."""
    want = traverse_util.flatten_dict(abstract)
    got = traverse_util.flatten_dict(host)
    check_tree_shapes(got, want, what, "run")

    def put(a, x):
        x = np.asarray(x)  # one host copy; each device then receives only its shard
        return jax.make_array_from_callback(a.shape, a.sharding, lambda idx: x[idx].astype(a.dtype))
    return traverse_util.unflatten_dict({k: put(a, got[k]) for k, a in want.items()})


# --- the trainer hook -------------------------------------------------------------------------------------------

def _get(tree, keys):
    return functools.reduce(lambda t, k: t[k], keys, tree)


def init_subtrees(state, abstract_state, config) -> None:
    """Fills the fresh train state's params (and EMA params, which must start from the same weights) in place
    from every checkpoint.init_subtrees entry."""
    from unifluid_jax.train import checkpoint as ckpt_lib
    abstract_params = abstract_state["params"]
    for sub in config.checkpoint.get("init_subtrees", ()):
        path = entry_path(sub)
        if not path:
            continue
        fmt = sub.get("format", "project") or "project"
        dst = [k for k in sub["dst"].split("/") if k]
        target = _get(abstract_params, dst)
        if fmt == "project":
            src = [k for k in sub.get("src", "").split("/") if k]
            wrapped = functools.reduce(lambda t, k: {k: t}, reversed(src), target)
            loaded, step = ckpt_lib.restore_params_from(path, wrapped)
            loaded, what = _get(loaded, src), f"step {step}"
        else:
            what = f"{fmt} checkpoint"
            # The converters trace abstract modules; run them on a plain host thread, outside the trainer's
            # mesh / logical-rules context (both thread-local), where unboxing would add sharding constraints.
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                host = pool.submit(convert, fmt, sub["dst"], path, config.model).result()
            loaded = place(host, target, f"checkpoint.init_subtrees ({fmt} {path} -> {sub['dst']})")
        _get(state["params"], dst[:-1])[dst[-1]] = loaded
        if "ema_params" in state:
            _get(state["ema_params"], dst[:-1])[dst[-1]] = jax.tree.map(jax.numpy.copy, loaded)
        log.info("initialised params/%s from %s (%s)", "/".join(dst), path, what)
