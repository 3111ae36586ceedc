"""karcher_mean against a float64 reference of the iteration, and the facts docs/design.md lists."""

import itertools
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from karcher_reference import (
    first_order_residual,
    karcher_reference,
    min_cosine,
    relative_error,
    sources_with_cosine,
)

from jkarcher import karcher, karcher_mean
from jkarcher.karcher import DEFAULT_TOL, model_tiles, slices_in_float32
from jkarcher.numerics import COMPILER_OPTIONS

REGIMES = {  # name: (pairwise cosine of the generated sources, the bound the regime promises)
    "far": (0.54, None),  # angles near 1 rad
    "finetune": (0.9995, 0.999),
    "near_identical": (0.99999995, 0.9999999),
}
SHAPE = (48, 70)


def _weights(rng, n):
    return rng.uniform(0.2, 3.0, n)


@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("mixed_norms", [False, True])
def test_float32_matches_float64_reference(regime, n, mixed_norms):
    rng = np.random.default_rng(zlib.crc32(f"{regime}-{n}-{mixed_norms}".encode()))
    cosine, promised = REGIMES[regime]
    norms = rng.uniform(0.05, 40.0, n) if mixed_norms else None
    sources = sources_with_cosine(rng, n, SHAPE, cosine, norms).astype(np.float32)
    if promised is not None:
        assert min_cosine(sources) >= promised
    else:
        assert 0.4 < min_cosine(sources) < 0.7
    weights = _weights(rng, n)
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray(weights))
    assert merged.dtype == jnp.float32 and merged.shape == SHAPE
    assert relative_error(merged, karcher_reference(sources, weights)) <= 1e-6


@pytest.mark.parametrize("regime", ["far", "finetune"])
def test_bfloat16_error_within_rounding_of_exact(regime):
    rng = np.random.default_rng(7)
    sources = sources_with_cosine(rng, 5, SHAPE, REGIMES[regime][0]).astype(ml_dtypes.bfloat16)
    weights = _weights(rng, 5)
    exact = karcher_reference(sources.astype(np.float64), weights)
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray(weights))
    assert merged.dtype == jnp.bfloat16
    ours = np.linalg.norm(np.asarray(merged, np.float64) - exact)
    rounding = np.linalg.norm(exact.astype(ml_dtypes.bfloat16).astype(np.float64) - exact)
    assert ours <= 1.05 * rounding


def test_out_dtype_rounds_once_to_the_dtype_asked():
    """bfloat16 sources give a bfloat16 mean by default; asked for float32, the float32 mean of
    the same values, as accurate as from float32 sources (eagerly and inside a jit)."""
    rng = np.random.default_rng(19)
    sources = sources_with_cosine(rng, 4, SHAPE, 0.6).astype(ml_dtypes.bfloat16)
    weights = jnp.asarray(_weights(rng, 4))
    exact = karcher_reference(sources.astype(np.float64), weights)
    assert karcher_mean(jnp.asarray(sources), weights).dtype == jnp.bfloat16
    eager = karcher_mean(jnp.asarray(sources), weights, out_dtype=jnp.float32)
    jitted = jax.jit(lambda s, w: karcher_mean(s, w, out_dtype=jnp.float32))(sources, weights)
    for merged in (eager, jitted):
        assert merged.dtype == jnp.float32
        assert relative_error(merged, exact) <= 1e-6


@pytest.mark.parametrize("t", [0.0, 0.1, 0.3, 0.5, 0.77, 1.0])
def test_two_sources_give_slerp_times_mean_norm(t):
    rng = np.random.default_rng(1)
    x = sources_with_cosine(rng, 2, (300,), 0.3, norms=[2.0, 5.0])
    u1, u2 = x[0] / 2.0, x[1] / 5.0
    theta = np.arccos(u1 @ u2)
    slerp = (np.sin((1 - t) * theta) * u1 + np.sin(t * theta) * u2) / np.sin(theta)
    expected = ((1 - t) * 2.0 + t * 5.0) * slerp
    merged = karcher_mean(jnp.asarray(x, jnp.float32), jnp.asarray([1 - t, t]))
    assert relative_error(merged, expected) <= 1e-6


@pytest.mark.parametrize("n", [1, 2, 5])
def test_equal_sources_give_themselves_back(n):
    x = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    merged = karcher_mean(jnp.asarray(np.stack([x] * n)), jnp.arange(1.0, n + 1.0))
    assert relative_error(merged, x) <= 1e-6


def test_permuting_sources_with_weights_changes_nothing():
    rng = np.random.default_rng(3)
    sources = sources_with_cosine(rng, 4, SHAPE, 0.6).astype(np.float32)
    weights = _weights(rng, 4)
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray(weights))
    for order in itertools.permutations(range(4)):
        order = list(order)
        permuted = karcher_mean(jnp.asarray(sources[order]), jnp.asarray(weights[order]))
        assert relative_error(permuted, merged) <= 1e-6


@pytest.mark.parametrize("scale", [1e-3, 0.5, 7.0, 1e4])
def test_scaling_every_source_scales_the_result(scale):
    rng = np.random.default_rng(4)
    sources = sources_with_cosine(rng, 3, SHAPE, 0.6)
    weights = _weights(rng, 3)
    merged = karcher_mean(jnp.asarray(sources, jnp.float32), jnp.asarray(weights))
    scaled = karcher_mean(jnp.asarray(sources * scale, jnp.float32), jnp.asarray(weights))
    assert relative_error(scaled, scale * np.asarray(merged, np.float64)) <= 1e-6


@pytest.mark.parametrize("cosine", [0.1, 0.6, 0.999])
def test_first_order_condition_holds_at_convergence(cosine):
    rng = np.random.default_rng(5)
    sources = sources_with_cosine(rng, 6, SHAPE, cosine, rng.uniform(1, 3, 6)).astype(np.float32)
    weights = _weights(rng, 6)
    merged, info = karcher_mean(jnp.asarray(sources), jnp.asarray(weights), return_info=True)
    assert float(info.tangent_norm[0]) < DEFAULT_TOL
    assert 1 <= int(info.iterations[0]) < 100
    assert first_order_residual(merged, sources, weights) < DEFAULT_TOL


def test_info_reports_iterations_and_tangent_norm():
    rng = np.random.default_rng(6)
    sources = jnp.asarray(sources_with_cosine(rng, 4, SHAPE, 0.2), jnp.float32)
    _, capped = karcher_mean(sources, None, max_iter=1, tol=1e-30, return_info=True)
    _, free = karcher_mean(sources, None, tol=1e-5, return_info=True)
    assert int(capped.iterations[0]) == 1 and float(capped.tangent_norm[0]) > 1e-5
    assert int(free.iterations[0]) > 1 and float(free.tangent_norm[0]) < 1e-5


def test_row_blocks_match_a_per_row_reference():
    rng = np.random.default_rng(8)
    rows = [
        sources_with_cosine(rng, 4, (33,), c, rng.uniform(0.5, 2, 4)) for c in (0.1, 0.9, 0.999)
    ]
    sources = np.stack(rows, axis=1).astype(np.float32)  # [N, rows, 33]
    weights = _weights(rng, 4)
    merged, info = karcher_mean(
        jnp.asarray(sources), jnp.asarray(weights), block="row", return_info=True
    )
    assert info.iterations.shape == (3,)
    for r in range(3):
        expected = karcher_reference(sources[:, r], weights)
        assert relative_error(merged[r], expected) <= 1e-6


def test_row_blocks_of_a_3d_tensor_use_the_first_axis():
    rng = np.random.default_rng(9)
    sources = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    merged = karcher_mean(jnp.asarray(sources), jnp.ones(3), block="row")
    for r in range(4):
        assert relative_error(merged[r], karcher_reference(sources[:, r])) <= 1e-6


def test_vectors_and_scalars_are_one_block_in_row_mode():
    sources = np.random.default_rng(10).standard_normal((3, 50)).astype(np.float32)
    merged = karcher_mean(jnp.asarray(sources), jnp.ones(3), block="row")
    assert relative_error(merged, karcher_reference(sources)) <= 1e-6


def test_zero_sources_take_no_part_in_the_direction_but_count_in_the_norm():
    rng = np.random.default_rng(11)
    x = sources_with_cosine(rng, 2, SHAPE, 0.5).astype(np.float32)
    sources = np.stack([x[0], np.zeros(SHAPE, np.float32), x[1]])
    weights = np.array([1.0, 2.0, 1.0])
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray(weights))
    direction = karcher_reference(x, [1.0, 1.0])
    expected = direction / np.linalg.norm(direction) * (3.0 + 0.0 + 3.0) / 4.0
    assert relative_error(merged, expected) <= 1e-6


def test_all_zero_sources_give_zero():
    merged = karcher_mean(jnp.zeros((3, *SHAPE)), jnp.ones(3))
    assert np.all(np.asarray(merged) == 0)


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.7, 0.3]])
def test_antipodal_pair_gives_a_finite_point_of_the_span(weights):
    x = np.random.default_rng(12).standard_normal(SHAPE).astype(np.float32)
    merged = np.asarray(karcher_mean(jnp.asarray(np.stack([x, -x])), jnp.asarray(weights)))
    assert np.all(np.isfinite(merged))
    # In the span {x, -x} the weighted objective is smallest at the first (heavier) source.
    assert relative_error(merged, x) <= 1e-6


def test_single_source_is_returned():
    x = np.random.default_rng(13).standard_normal(SHAPE).astype(np.float32)
    assert relative_error(karcher_mean(jnp.asarray(x[None]), jnp.ones(1)), x) <= 1e-6


def test_near_identical_sources_are_finite_and_exact():
    rng = np.random.default_rng(14)
    sources = sources_with_cosine(rng, 3, (4096,), 0.99999999).astype(np.float32)
    assert min_cosine(sources) >= 0.9999999
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray([1.0, 2.0, 3.0]))
    assert np.all(np.isfinite(np.asarray(merged)))
    assert relative_error(merged, karcher_reference(sources, [1.0, 2.0, 3.0])) <= 1e-6


def test_long_vector_sums_stay_accurate():
    rng = np.random.default_rng(15)
    sources = sources_with_cosine(rng, 3, (1_000_003,), 0.7).astype(np.float32)
    merged = karcher_mean(jnp.asarray(sources), jnp.asarray([1.0, 2.0, 3.0]))
    assert relative_error(merged, karcher_reference(sources, [1.0, 2.0, 3.0])) <= 1e-6


def test_float64_compute_under_x64():
    rng = np.random.default_rng(16)
    sources = sources_with_cosine(rng, 4, SHAPE, 0.6)
    weights = _weights(rng, 4)
    with jax.enable_x64(True):
        merged = karcher_mean(jnp.asarray(sources), jnp.asarray(weights), tol=1e-13)
        assert merged.dtype == jnp.float64
        assert relative_error(merged, karcher_reference(sources, weights)) <= 1e-12


def test_jit_and_traced_weights():
    rng = np.random.default_rng(17)
    sources = jnp.asarray(sources_with_cosine(rng, 3, SHAPE, 0.6), jnp.float32)
    weights = jnp.asarray(_weights(rng, 3))
    jitted = jax.jit(lambda s, w: karcher_mean(s, w))(sources, weights)
    assert relative_error(jitted, karcher_mean(sources, weights)) <= 1e-7


def test_step_size_changes_the_path_not_the_fixed_point():
    rng = np.random.default_rng(18)
    sources = sources_with_cosine(rng, 4, SHAPE, 0.5).astype(np.float32)
    merged = karcher_mean(jnp.asarray(sources), None, step=0.5)
    assert relative_error(merged, karcher_reference(sources)) <= 1e-6


def test_unknown_block_mode_is_an_error():
    with pytest.raises(ValueError, match="block"):
        karcher_mean(jnp.ones((2, 3)), jnp.ones(2), block="column")


def test_model_tiles_cover_the_models_in_near_equal_tiles():
    for n in range(1, 33):
        tiles = model_tiles(n)
        assert [i for tile in tiles for i in tile] == list(range(n))
        sizes = [len(tile) for tile in tiles]
        assert max(sizes) <= 8 and max(sizes) - min(sizes) <= 1 and len(tiles) == -(-n // 8)


@pytest.mark.parametrize("n", [5, 9, 13])
def test_the_compiled_mean_keeps_no_float32_copy_of_a_source(n):
    """XLA's own memory analysis of the compiled leaf: its scratch stays under a quarter of one
    source in float32 (a float32 copy of a [151936, 2048] embedding would be 1.2 GB)."""
    shape = (4864, 896)
    stacked = jax.ShapeDtypeStruct((n, *shape), jnp.bfloat16)
    weights = jax.ShapeDtypeStruct((n,), jnp.float32)
    compiled = jax.jit(lambda s, w: karcher_mean(s, w)).lower(stacked, weights).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * np.prod(shape) / 4


@pytest.mark.parametrize("n", [16, 24])
def test_models_stacked_in_the_program_keep_no_float32_copy_of_the_stack(n):
    """16 or more bfloat16 models passed one array each and stacked inside the program
    (`slices_in_float32`): the scratch, mostly the N (N + 1) / 2 pairs' per-chunk sums, stays
    under one source in float32, where a stacked argument would take two stacks' bytes."""
    shape = (4864, 896)
    models = tuple(jax.ShapeDtypeStruct(shape, jnp.bfloat16) for _ in range(n))
    weights = jax.ShapeDtypeStruct((n,), jnp.float32)
    merge = jax.jit(lambda models, w: karcher_mean(jnp.stack(models), w))
    compiled = merge.lower(models, weights).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 4 * np.prod(shape)


def test_a_bfloat16_stack_of_16_models_merges_as_the_models_stacked_in_a_program(monkeypatch):
    """On CPU, `karcher_mean` of a bfloat16 stack of 16 or more models passes it model by model
    (`slices_in_float32`), never to the program that takes the stack whole; the result is that
    of the models stacked inside one program, within bf16 rounding of the float64 reference."""

    compiled_mean = karcher._jitted_karcher_mean

    def models_only(models, *args, **kwargs):
        if not isinstance(models, tuple) or len(models) != 16:
            raise AssertionError("the bfloat16 stack went whole into the compiled mean")
        return compiled_mean(models, *args, **kwargs)

    monkeypatch.setattr(karcher, "_jitted_karcher_mean", models_only)
    rng = np.random.default_rng(3)
    sources = sources_with_cosine(rng, 16, SHAPE, REGIMES["finetune"][0])
    stacked = jnp.asarray(sources, jnp.bfloat16)
    weights = jnp.asarray(_weights(rng, 16), jnp.float32)
    in_program = jax.jit(
        lambda models, w: karcher_mean(jnp.stack(models), w), compiler_options=COMPILER_OPTIONS
    )
    merged = karcher_mean(stacked, weights)
    np.testing.assert_array_equal(merged, in_program(tuple(stacked), weights))
    exact = karcher_reference(np.asarray(stacked, np.float64), np.asarray(weights, np.float64))
    rounding = np.linalg.norm(exact.astype(ml_dtypes.bfloat16).astype(np.float64) - exact)
    assert np.linalg.norm(np.asarray(merged, np.float64) - exact) <= 1.05 * rounding
    assert slices_in_float32(stacked) and slices_in_float32(np.asarray(stacked))
    assert not slices_in_float32(stacked[:15]) and not slices_in_float32(
        stacked.astype(jnp.float16)
    )
