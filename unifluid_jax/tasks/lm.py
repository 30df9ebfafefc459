"""Toy LM task: a tiny Gemma learns copy / reverse / sort of digit strings (procedural, exact, deterministic).

Sequence layout (length T = 2 * max_len + 4, right-padded):
    [BOS, OP, d_1 .. d_n, SEP, y_1 .. y_n, EOS, PAD ...]      y = d, reversed(d) or sorted(d)
`loss_mask` is 1 on the tokens to predict (y_1 .. EOS). Example `i` of the global stream is a pure function
of (data.seed, i): global batch s holds examples s*B .. s*B+B-1 whatever the number of processes.

config.gemma: the Gemma section (models/gemma.py); config.data: seed, min_len, max_len, ops.
"""
from __future__ import annotations

import grain
import jax
import jax.numpy as jnp
import numpy as np

from unifluid_jax.config import check, check_positive
from unifluid_jax.train import task as task_lib

PAD, BOS, EOS, SEP = 0, 1, 2, 3
OPS = {"copy": 4, "reverse": 5, "sort": 6}
DIGIT0 = 7  # digits 0..9 -> 7..16
VOCAB = DIGIT0 + 10


def seq_len(data) -> int:
    return 2 * int(data.max_len) + 4


class ToyDigits:
    """Random-access source: item i -> {'tokens', 'loss_mask'} (numpy), deterministic in (seed, i)."""

    def __init__(self, seed: int, min_len: int, max_len: int, ops):
        self.seed, self.min_len, self.max_len = int(seed), int(min_len), int(max_len)
        self.ops = [OPS[o] for o in ops]

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        n = int(rng.integers(self.min_len, self.max_len + 1))
        op = self.ops[int(rng.integers(len(self.ops)))]
        d = rng.integers(0, 10, size=n)
        y = {OPS["copy"]: d, OPS["reverse"]: d[::-1], OPS["sort"]: np.sort(d)}[op]
        t = 2 * self.max_len + 4
        tokens = np.full((t,), PAD, np.int32)
        seq = np.concatenate([[BOS, op], d + DIGIT0, [SEP], y + DIGIT0, [EOS]]).astype(np.int32)
        tokens[:len(seq)] = seq
        mask = np.zeros((t,), np.float32)
        mask[n + 3:2 * n + 4] = 1.0  # y_1 .. EOS
        return {"tokens": tokens, "loss_mask": mask}


def make_dataset(data, global_batch: int, shard: int, num_shards: int) -> grain.MapDataset:
    """Batches of this shard's rows: local batch j holds global examples j*B + shard*b .. + b - 1."""
    local = global_batch // num_shards
    src = ToyDigits(data.seed, data.min_len, data.max_len, data.ops)

    def example(j):
        step, r = divmod(int(j), local)
        return src[step * global_batch + shard * local + r]

    return grain.MapDataset.range(1 << 40).map(example).batch(local, drop_remainder=True)


class LMTask(task_lib.Task):
    batch_logical_axes = {"tokens": ("act_batch", None), "loss_mask": ("act_batch", None)}

    def __init__(self, config):
        super().__init__(config)
        from unifluid_jax.models import gemma
        self.gemma = gemma
        self.model = gemma.Gemma(gemma.config_from_dict(config.gemma))

    @classmethod
    def validate_config(cls, config) -> None:
        from unifluid_jax.models import gemma
        gemma.validate_config(config.gemma, "gemma")
        data = config.data
        check_positive(data, "data", "min_len", "max_len")
        check(data.min_len <= data.max_len, "data.min_len", f"must be <= data.max_len ({data.max_len})")
        check(len(data.ops) > 0 and all(o in OPS for o in data.ops), "data.ops",
              f"choose a non-empty subset of {sorted(OPS)}, got {list(data.ops)}")
        vocab = gemma.config_from_dict(config.gemma).vocab_size
        check(vocab >= VOCAB, "gemma.vocab_size", f"the toy task needs >= {VOCAB} tokens, got {vocab}")

    def init_params(self, rng):
        return self.gemma.init_params(self.model, rng, seq_len(self.config.data) - 1)

    def loss_fn(self, params, batch, rng, step):
        del rng, step  # deterministic model (no dropout)
        tokens, mask = batch["tokens"], batch["loss_mask"][:, 1:]
        logits = self.model.apply({"params": params}, tokens[:, :-1], method="forward")
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target = tokens[:, 1:]
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        denom = jnp.maximum(mask.sum(), 1.0)
        loss = (nll * mask).sum() / denom
        acc = ((logits.argmax(-1) == target) * mask).sum() / denom
        return loss, {"lm_loss": loss, "accuracy": acc}

    def eval_fn(self, params, step, writer):
        """Teacher-forced loss / token accuracy on a fixed held-out batch (examples from the far end of the
        index space, never reached in training). Same on every process (the batch is global)."""
        if not hasattr(self, "_eval"):
            src = ToyDigits(self.config.data.seed, self.config.data.min_len, self.config.data.max_len,
                            self.config.data.ops)
            n = int(self.config.data.get("eval_examples", 256))
            exs = [src[(1 << 40) + i] for i in range(n)]
            self._eval_batch = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
            self._eval = jax.jit(lambda p, b: self.loss_fn(p, b, None, 0)[1])
        out = jax.device_get(self._eval(params, self._eval_batch))
        return {k: float(v) for k, v in out.items()}

    def make_input(self, config, process_index: int, process_count: int):
        ds = make_dataset(config.data, config.train.batch_size, process_index, process_count)
        opts = grain.ReadOptions(num_threads=int(config.data.get("num_threads", 0)),
                                 prefetch_buffer_size=int(config.data.get("prefetch", 0)))
        return iter(ds.to_iter_dataset(opts))

    def tokens_per_batch(self, batch) -> int:
        return int(np.prod(batch["tokens"].shape))
