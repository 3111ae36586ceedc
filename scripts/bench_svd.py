"""Time the truncated SVD of `jkarcher.linalg.randomized_svd` against a dense `jnp.linalg.svd`.

On Qwen2.5-0.5B-shaped task matrices (an MLP matrix 4864 x 896 and the embedding 151936 x 896,
float32): a fine-tune-like update, a low-rank part with a decaying spectrum plus noise. For each
rank k (TSV-M keeps rank / N triplets per task: 224 of 896 at N = 4) it prints the best of
--repeats runs in milliseconds of both, their ratio, and the largest error of the top k singular
values against the dense ones relative to the largest, all measured in this run.

    python scripts/bench_svd.py [--sizes=mlp,embed] [--ranks=32,224] [--repeats=3]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_timing import best_time

from jkarcher.linalg import randomized_svd

SHAPES = {"mlp": (4864, 896), "embed": (151936, 896)}

_SIZES = flags.DEFINE_list("sizes", ["mlp", "embed"], f"matrix shapes to time, of {list(SHAPES)}")
_RANKS = flags.DEFINE_list("ranks", ["32", "224"], "truncation ranks k")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed runs per case; the best is reported")


def task_matrix(shape: tuple[int, int], seed: int = 0) -> jax.Array:
    """A rank-256 update with singular values 0.99^j (j < 256) plus entrywise noise of 1e-3."""
    rng = np.random.default_rng(seed)
    m, n = shape
    u = rng.standard_normal((m, 256), dtype=np.float32) / np.sqrt(m)
    v = rng.standard_normal((n, 256), dtype=np.float32) / np.sqrt(n)
    spectrum = (0.99 ** np.arange(256)).astype(np.float32)
    noise = 1e-3 * rng.standard_normal(shape, dtype=np.float32) / np.sqrt(max(m, n))
    return jnp.asarray((u * spectrum) @ v.T + noise)


def main(argv):
    del argv
    dense = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False, compute_uv=True))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32 matrices")
    header = f"{'matrix':>12} {'k':>4} {'dense ms':>10} {'randomized ms':>14} {'ratio':>7}"
    print(f"{header} {'s err':>9}")
    for size in _SIZES.value:
        matrix = task_matrix(SHAPES[size])
        dense_ms, (_, exact, _) = best_time(dense, matrix, repeats=_REPEATS.value)
        for k in map(int, _RANKS.value):
            fast = jax.jit(lambda a, k=k: randomized_svd(a, k, jax.random.key(0)))
            fast_ms, (_, s, _) = best_time(fast, matrix, repeats=_REPEATS.value)
            error = float(jnp.max(jnp.abs(s - exact[:k])) / exact[0])
            shape = "x".join(map(str, SHAPES[size]))
            print(
                f"{shape:>12} {k:>4} {dense_ms:>10.1f} {fast_ms:>14.1f} "
                f"{fast_ms / dense_ms:>7.3f} {error:>9.1e}",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
