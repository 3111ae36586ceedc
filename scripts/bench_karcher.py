"""Time karcher_mean per tensor against a linear mean and the textbook full-tensor iteration.

All three run in this process on the same sources: Qwen2.5-0.5B-shaped tensors (an MLP matrix
4864 x 896 and the embedding 151936 x 896), bfloat16 as checkpoints store them (--dtype=float32
for float32), for N = 2, 4, 8 (or --models) fine-tune-like experts (each a shared base plus its
own perturbation), each compiled as jkarcher compiles its leaves (`COMPILER_OPTIONS`). The
textbook loop is the Karcher iteration written on whole tensors, as docs/design.md states it:
every iteration reads every source twice (the cosines, then the tangent), where karcher_mean
reads them twice in all. Prints milliseconds, ratios, iteration counts and the largest
difference between karcher_mean and the textbook result (both in float32), and the time of
karcher_mean's first pass alone (the Gram matrix of the sources): karcher_mean costs that pass
plus an output pass that reads the sources as a linear mean does, so karcher / linear is at least
1 + gram / linear. Last, `karcher_mean` called eagerly on the sources stacked in one array, as a
user may call it (16 or more bfloat16 sources: split into models first, `slices_in_float32`).

    python scripts/bench_karcher.py [--sizes=mlp] [--models=4,8,16] [--dtype=float32]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from bench_timing import best_time

from jkarcher import karcher_mean
from jkarcher.karcher import DEFAULT_MAX_ITER, DEFAULT_TOL, gram_matrices
from jkarcher.numerics import (
    COMPILER_OPTIONS,
    chunked,
    compute_dtype,
    sum_over_models,
    weighted_sum,
)
from jkarcher.sphere import sin_over_theta, theta_over_sin

SHAPES = {"mlp": (4864, 896), "embed": (151936, 896)}

_SIZES = flags.DEFINE_list("sizes", ["mlp", "embed"], f"tensor shapes to time, of {list(SHAPES)}")
_MODELS = flags.DEFINE_list("models", ["2", "4", "8"], "numbers of source models")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "the sources' dtype")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per case; the best is reported")
_SPREAD = flags.DEFINE_float("spread", 0.1, "perturbation norm relative to the base's")


def linear_mean(stacked, weights):
    """The Euclidean baseline: sum_i w_i x_i / sum_i w_i."""
    return (weighted_sum(stacked, weights) / jnp.sum(weights)).astype(stacked.dtype)


def textbook_karcher(stacked, weights, max_iter=DEFAULT_MAX_ITER, tol=DEFAULT_TOL):
    """The fixed point iterated on full tensors (u has the size of one source)."""
    n = stacked.shape[0]
    x = [stacked[i].astype(jnp.float32) for i in range(n)]
    norms = jnp.stack([jnp.linalg.norm(xi) for xi in x])
    units = [xi / norms[i] for i, xi in enumerate(x)]
    alphas = weights / jnp.sum(weights)
    start = sum_over_models(alphas[i] * units[i] for i in range(n))
    start = start / jnp.linalg.norm(start)

    def keep_going(state):
        iteration, _, tangent_norm = state
        return (iteration < max_iter) & (tangent_norm >= tol)

    def update(state):
        iteration, u, _ = state
        cosines = jnp.clip(jnp.stack([jnp.vdot(u, ui) for ui in units]), -1.0, 1.0)
        scales = alphas * theta_over_sin(jnp.arccos(cosines))
        tangent = sum_over_models(scales[i] * (units[i] - cosines[i] * u) for i in range(n))
        tangent_norm = jnp.linalg.norm(tangent)
        moved = jnp.cos(tangent_norm) * u + sin_over_theta(tangent_norm) * tangent
        return iteration + 1, moved / jnp.linalg.norm(moved), tangent_norm

    state = (jnp.int32(0), start, jnp.float32(jnp.inf))
    iterations, u, _ = jax.lax.while_loop(keep_going, update, state)
    merged = (jnp.sum(weights * norms) / jnp.sum(weights)) * u
    return merged, iterations


def fine_tune_like(
    n: int, shape: tuple[int, ...], spread: float, dtype: str, seed: int = 0
) -> jax.Array:
    """N sources: one random base plus independent perturbations of relative norm `spread`."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape, dtype=np.float32)
    stacked = np.stack(
        [base + spread * rng.standard_normal(shape, dtype=np.float32) for _ in range(n)]
    )
    return tuple(jnp.asarray(source, dtype) for source in stacked)


def compiled(fn):
    """`fn` of stacked sources and weights, compiled as jkarcher compiles its leaves: with
    `COMPILER_OPTIONS`, the N sources passed as separate arrays and stacked inside, as
    `jkarcher.merge` passes them. (Slicing a stacked argument is slower on XLA:CPU: 4.8 against
    2.6 ms for a linear mean of 8 bfloat16 sources of 4864 x 896, and at N = 16 XLA converts the
    whole bfloat16 stack to float32 first, 112 ms.)"""
    return jax.jit(lambda xs, w: fn(jnp.stack(xs), w), compiler_options=COMPILER_OPTIONS)


def main(argv):
    del argv
    karcher = compiled(lambda s, w: karcher_mean(s, w, return_info=True))
    exact = compiled(lambda s, w: karcher_mean(s, w, out_dtype=jnp.float32))
    linear = compiled(linear_mean)
    textbook = compiled(textbook_karcher)
    gram = compiled(lambda s, w: gram_matrices([chunked(x, 1) for x in s], compute_dtype()))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {len(jax.devices())} device(s)")
    header = (
        f"{'tensor':>16} {'N':>2} {'linear ms':>10} {'karcher ms':>11} {'textbook ms':>12} "
        f"{'karcher/linear':>15} {'textbook/karcher':>17} {'iters':>6} {'max rel diff':>13} "
        f"{'gram ms':>8} {'gram/linear':>12} {'eager ms':>9}"
    )
    print(header)
    for size in _SIZES.value:
        shape = SHAPES[size]
        for n in map(int, _MODELS.value):
            sources = fine_tune_like(n, shape, _SPREAD.value, _DTYPE.value)
            weights = jnp.linspace(1.0, 2.0, n)
            repeats = _REPEATS.value if size == "mlp" else max(1, _REPEATS.value // 2)
            t_linear, _ = best_time(linear, sources, weights, repeats=repeats)
            t_karcher, (_, info) = best_time(karcher, sources, weights, repeats=repeats)
            t_textbook, (theirs, _) = best_time(textbook, sources, weights, repeats=repeats)
            t_gram, _ = best_time(gram, sources, weights, repeats=repeats)
            stacked = jnp.stack(sources)
            t_eager, _ = best_time(karcher_mean, stacked, weights, repeats=repeats)
            ours = exact(sources, weights)
            difference = float(jnp.max(jnp.abs(ours - theirs)) / jnp.max(jnp.abs(theirs)))
            print(
                f"{'x'.join(map(str, shape)):>16} {n:>2} {t_linear:>10.1f} {t_karcher:>11.1f} "
                f"{t_textbook:>12.1f} {t_karcher / t_linear:>15.2f} "
                f"{t_textbook / t_karcher:>17.1f} {int(info.iterations[0]):>6} "
                f"{difference:>13.1e} {t_gram:>8.1f} {t_gram / t_linear:>12.2f} {t_eager:>9.1f}"
            )
            del sources, stacked, ours, theirs


if __name__ == "__main__":
    app.run(main)
