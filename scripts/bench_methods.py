"""Time every merge method's leaf on one tensor against the linear mean of the same sources.

One Qwen2.5-0.5B MLP matrix (4864 x 896, bfloat16 as checkpoints store it), N = 4 fine-tune-like
experts of a shared base (and the base, for methods that use one), each method called through
`jkarcher.merge`, which compiles its leaf as it compiles every leaf, with its default parameters
(t = 0.5 where it needs one; a key for the random ones; made-up Fishers for Fisher merging and
input Grams for RegMean).
Prints the best of --repeats runs in milliseconds and the ratio to linear, measured in this run.

    python scripts/bench_methods.py [--methods=tsv,iso_c,iso_cts] [--models=4] [--repeats=5]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_timing import best_time

import jkarcher
from jkarcher import methods

SHAPE = (4864, 896)
# Values for parameters without a default.
REQUIRED = {"t": 0.5}

_METHODS = flags.DEFINE_list("methods", None, "methods to time (default: every registered one)")
_MODELS = flags.DEFINE_integer("models", 4, "number of source models")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per method; the best is reported")


def made_up_input(name: str, rng: np.random.Generator) -> jax.Array:
    """A positive diagonal Fisher shaped like the leaf, or an input Gram X^T X / T [in, in] of
    T = 2 in random inputs."""
    if name == "gram":
        inputs = rng.standard_normal((2 * SHAPE[1], SHAPE[1]), dtype=np.float32)
        return jnp.asarray(inputs.T @ inputs / len(inputs))
    return jnp.asarray(rng.uniform(0.1, 1.0, SHAPE), jnp.float32)


def main(argv):
    del argv
    rng = np.random.default_rng(0)
    base = rng.standard_normal(SHAPE, dtype=np.float32)
    experts = [base + 0.1 * rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(8)]
    as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
    base = as_bf16(base)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; {SHAPE} bfloat16 leaves")
    print(f"{'method':>18} {'N':>2} {'ms':>9} {'x linear':>9}")
    linear_ms = None
    for name in ["linear", *(_METHODS.value or [m for m in methods.names() if m != "linear"])]:
        spec = methods.get(name)
        n = (
            spec.max_models
            if spec.max_models and spec.max_models < _MODELS.value
            else _MODELS.value
        )
        sources = [as_bf16(x) for x in experts[:n]]
        params = {p.name: REQUIRED[p.name] for p in spec.params if p.name in REQUIRED}
        key = jax.random.key(0) if spec.random else None
        params |= {
            input_name: [made_up_input(input_name, rng) for _ in sources]
            for input_name in spec.tensor_inputs
            if spec.tensor_inputs_required
        }
        with_base = spec.base == methods.BASE_REQUIRED

        def merge(xs, b, spec=spec, params=params, key=key):
            return jkarcher.merge(xs, method=spec.name, base=b, key=key, **params)

        ms, _ = best_time(merge, sources, base if with_base else None, repeats=_REPEATS.value)
        linear_ms = linear_ms or ms
        print(f"{name:>18} {n:>2} {ms:>9.1f} {ms / linear_ms:>9.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
