"""Every merge method against mergekit's own implementation, through its in-memory API.

mergekit (0.1.5, the version the test extra pins) is the reference for what each method's name and
parameters mean. Deterministic methods must agree to 1e-6 on random float32 tensors, and on
bfloat16-valued ones but at the entries tied across a top-k cut (which each library breaks in its
own order); random methods must agree exactly when given the same keep-masks, and in
distribution over many draws; karcher agrees to the tolerance mergekit iterates to, and differs
where this library differs on purpose.
Without mergekit the module is skipped, except in CI, where it must run.
"""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from karcher_reference import (
    curvature_bound,
    first_order_residual,
    karcher_reference,
    relative_error,
    sources_with_cosine,
)

import jkarcher
from jkarcher import methods
from jkarcher.methods import arcee_fusion, sce, sparsify, task_arithmetic, task_arithmetic_methods
from jkarcher.numerics import chunks_per_row

try:
    import torch
    from mergekit.merge_methods import sce as mergekit_sce
    from mergekit.merge_methods.api import merge_tensors
    from mergekit.sparsify import SparsificationMethod
    from mergekit.sparsify import sparsify as mergekit_sparsify
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("mergekit is not installed (pip install -e '.[test]')", allow_module_level=True)

TOLERANCE = 1e-6
# At most this many entries, or this share of a tensor, may tie across the cuts of a merge: a cut
# of bfloat16 magnitudes (spacing 2^-8 v near v) ties about 0.5% of the D entries, per model.
MAX_TIED = 8
MAX_TIED_SHARE = 0.02
SHAPES = [(97,), (16, 16), (24, 40)]
# mergekit's slerp takes its t = 0 end as the base model; here it is model 0 of two.
BASE_IS_MODEL_0 = {"slerp"}
# mergekit's karcher iteration: its defaults.
MERGEKIT_KARCHER_TOL = 1e-5


def _ours(method, models, weights, base=None, key=None, **params):
    merged = jkarcher.merge(
        [jnp.asarray(m) for m in models],
        weights,
        method=method,
        base=None if base is None else jnp.asarray(base),
        key=key,
        **params,
    )
    return np.asarray(merged)


def _theirs(method, models, weights, base=None, **params):
    tensors = [torch.from_numpy(np.asarray(m)) for m in models]
    parameters = dict(params)
    if methods.get(method).weighted:
        parameters["weight"] = [float(w) for w in weights]
    base_index = 0 if method in BASE_IS_MODEL_0 else None
    if base is not None:
        tensors.insert(0, torch.from_numpy(np.asarray(base)))
        base_index = 0
    merged = merge_tensors(tensors, method, parameters=parameters, base_index=base_index)
    return merged.numpy()


def _inputs(seed, shape, n_models, with_base, spread=0.5, weights=None):
    """N(0, 1) models, or with a base N(0, 1) the base plus task vectors spread * N(0, 1); weights
    in [0.3, 2].

    With task vectors half the base's size, results stay below ~4 in magnitude, where float32's
    spacing is at most 4.8e-7: room within 1e-6 for the two implementations' different orders of
    summation (unnormalized sums, rescaling and lambda scale task vectors up).
    """
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape).astype(np.float32) if with_base else None
    noise = rng.standard_normal((n_models, *shape))
    models = (noise if base is None else base + spread * noise).astype(np.float32)
    weights = rng.uniform(0.3, 2.0, n_models) if weights is None else np.asarray(weights)
    return models, weights, base


DETERMINISTIC = [  # (method, models, with a base, parameters, options of the data)
    ("linear", 3, False, {}, {}),
    ("linear", 3, False, {"normalize": False}, {}),
    ("slerp", 2, False, {"t": 0.3}, {}),
    ("slerp", 2, False, {"t": 0.85}, {}),
    ("nuslerp", 2, False, {}, {}),
    ("nuslerp", 2, True, {}, {}),
    ("nuslerp", 2, True, {"nuslerp_flatten": False}, {}),
    ("nuslerp", 2, False, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, {}),
    ("multislerp", 3, False, {}, {}),
    ("multislerp", 4, True, {}, {}),
    ("multislerp", 3, True, {"normalize_weights": False}, {"weights": [0.2, 0.5, 0.4]}),
    ("task_arithmetic", 3, True, {}, {}),
    ("task_arithmetic", 3, True, {"normalize": True, "lambda": 0.6}, {}),
    ("ties", 3, True, {"density": 0.4}, {}),
    ("ties", 3, True, {"density": [0.3, 0.7, 1.0], "rescale": True, "lambda": 1.4}, {}),
    ("ties", 4, True, {"density": 0.5, "normalize": False}, {}),
    ("breadcrumbs", 3, True, {"density": 0.6}, {}),
    ("breadcrumbs", 3, True, {"density": [0.5, 0.8, 0.9], "gamma": [0.05, 0.1, 0.3]}, {}),
    ("breadcrumbs_ties", 3, True, {"density": 0.7, "gamma": 0.1, "rescale": True}, {}),
    ("sce", 3, True, {}, {}),
    ("sce", 4, True, {"select_topk": 0.3}, {}),
    # Task vectors of 1e-3: mean squares below mergekit's 1e-6 floor, so equal weights.
    ("sce", 3, True, {"select_topk": 0.5}, {"spread": 1e-3}),
    ("model_stock", 3, True, {}, {}),
    ("model_stock", 2, True, {"filter_wise": True}, {}),
    ("arcee_fusion", 1, True, {}, {}),
    ("nearswap", 1, True, {"t": 0.5}, {}),
    ("nearswap", 1, True, {"t": 0.01}, {}),
    ("passthrough", 1, False, {}, {}),
    ("passthrough", 1, False, {"scale": -0.5}, {}),
]


def _on_every_shape(cases):
    """Each case on each shape; all but one shape per case (rotating) are marked slow."""
    return [
        pytest.param(
            *case,
            shape,
            id=f"{case[0]}-{i}-{shape}",
            marks=() if j == i % len(SHAPES) else pytest.mark.slow,
        )
        for i, case in enumerate(cases)
        for j, shape in enumerate(SHAPES)
    ]


# float32 values drawn at random, or rounded to bfloat16 first: then many magnitudes tie.
VALUES = ("float32", "bfloat16")


@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize(
    "method,n_models,with_base,params,data,shape", _on_every_shape(DETERMINISTIC)
)
def test_deterministic_methods_equal_mergekit(
    method, n_models, with_base, params, data, shape, values, record_property, monkeypatch
):
    """Equal to 1e-6 everywhere but at the entries tied across a top-k cut, where mergekit's sort
    breaks ties in its own order; those are few. Both compute in float32 on the same values. SCE
    is given mergekit's variance mask (see `_ours_given_mergekits_sce_mask`)."""
    models, weights, base = _inputs(len(shape) + n_models, shape, n_models, with_base, **data)
    if values == "bfloat16":
        models, base = _bfloat16_valued(models), _bfloat16_valued(base)
    resolved = methods.get(method).resolve(params, n_models, with_base)
    if method == "sce" and resolved["select_topk"] < 1:
        ours = _ours_given_mergekits_sce_mask(models, base, resolved, monkeypatch)
    else:
        ours = _ours(method, models, weights, base, **params)
    theirs = _theirs(method, models, weights, base, **params)
    boundary = _tied_across_a_cut(method, models, base, resolved)
    difference = np.abs(ours.astype(np.float64) - theirs)
    off_boundary = float(np.max(difference[~boundary], initial=0.0))
    record_property("max_abs_difference_off_boundary", off_boundary)
    record_property("boundary_entries", int(boundary.sum()))
    print(
        f"{method} {params} {values} {shape}: max |ours - mergekit| off the boundary "
        f"{off_boundary:.3g}, {int(boundary.sum())} of {boundary.size} entries on it"
    )
    assert ours.dtype == np.float32 and ours.shape == shape
    assert boundary.sum() <= max(MAX_TIED, MAX_TIED_SHARE * boundary.size)
    assert off_boundary <= TOLERANCE


def _bfloat16_valued(array):
    return None if array is None else array.astype(ml_dtypes.bfloat16).astype(np.float32)


def _tied_across_a_cut(method, models, base, params):
    """The entries whose magnitude ties across a top-k cut, where each library may keep a
    different one of the tied entries: the union over the models' cuts.

    TIES cuts each model's magnitudes |x_i - base| at k = max(1, floor(density D)), breadcrumbs at
    o = min(floor(gamma D), D - m) and o + m with m = floor(density D) (positions in decreasing
    order). Both libraries compute the same float32 magnitudes, so a tie is an equality: the
    entries equal to the values on both sides of a cut.
    """
    tied = np.zeros(models.shape[1:], bool)
    if method not in {"ties", "breadcrumbs", "breadcrumbs_ties"}:
        return tied
    n, size = len(models), models[0].size
    densities = task_arithmetic.per_model(params["density"], n)
    gammas = task_arithmetic.per_model(params.get("gamma", 0.0), n)
    for model, density, gamma in zip(models, densities, gammas, strict=True):
        if density >= 1:
            continue
        kept = int(density * size)
        if method == "ties":
            cuts = [max(1, kept)]
        else:
            outliers = min(int(gamma * size), size - kept)
            cuts = [outliers, outliers + kept]
        magnitude = np.abs(model - base)
        ordered = np.sort(magnitude, axis=None)[::-1]
        for cut in cuts:
            if 0 < cut < size and ordered[cut - 1] == ordered[cut]:
                tied |= magnitude == ordered[cut]
    return tied


def _ours_given_mergekits_sce_mask(models, base, params, monkeypatch):
    """SCE with the variance mask that mergekit selects. Where variances tie across the cut
    (within float32 rounding, which each library, and each compilation, does its own way) the two
    keep different entries, and the model weights, computed after masking, then differ
    everywhere; test_topk checks that the masks differ only there. A fresh jit of the leaf keeps
    merge's cached one untouched."""
    deltas = torch.from_numpy(models - base)
    mask = jnp.asarray(mergekit_sce.sce_mask(deltas, params["select_topk"]).numpy() != 0)
    monkeypatch.setattr(sce, "variance_topk_mask", lambda deltas, select_topk: mask)
    leaf = jax.jit(lambda s, b: sce.sce(s, None, b, select_topk=params["select_topk"]))
    return np.asarray(leaf(jnp.asarray(models), jnp.asarray(base)))


LARGE = [  # beyond 2^17 entries the order statistics take the radix-selection path
    pytest.param("ties", {"density": 0.3}),
    pytest.param("breadcrumbs_ties", {"density": 0.5, "gamma": 0.05}, marks=pytest.mark.slow),
    pytest.param("sce", {"select_topk": 0.4}, marks=pytest.mark.slow),
]
LARGE_SHAPE = (400, 384)


@pytest.mark.parametrize("method,params", LARGE)
def test_order_statistic_methods_equal_mergekit_on_a_large_tensor(method, params):
    models, weights, base = _inputs(9, LARGE_SHAPE, 3, True)
    ours = _ours(method, models, weights, base, **params)
    theirs = _theirs(method, models, weights, base, **params)
    assert np.max(np.abs(ours - theirs)) <= TOLERANCE


@pytest.mark.slow
def test_arcee_fusion_equals_mergekit_on_a_large_tensor_but_at_its_threshold():
    """Importance is |x - b| times a KL divergence of softmaxes, whose float32 values differ
    between implementations by ~1e-7 relative; an entry that close to the threshold may be
    taken from either model. Every other entry agrees to 1e-6."""
    models, weights, base = _inputs(9, LARGE_SHAPE, 1, True)
    ours = _ours("arcee_fusion", models, weights, base)
    theirs = _theirs("arcee_fusion", models, weights, base)
    importance = arcee_fusion.fusion_importance(jnp.asarray(models[0]), jnp.asarray(base))
    threshold = float(arcee_fusion.fusion_threshold(importance))
    differ = np.abs(ours - theirs) > TOLERANCE
    assert np.all(np.abs(np.asarray(importance)[differ] - threshold) <= 1e-6 * threshold)


RANDOM = [  # (method, parameters); densities < 1 so that mergekit draws one mask per model
    ("dare_linear", {"density": 0.4}),
    ("dare_linear", {"density": 0.5, "rescale": False, "normalize": True}),
    ("dare_ties", {"density": [0.3, 0.6, 0.9]}),
    ("della", {"density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"density": [0.4, 0.6, 0.7], "epsilon": 0.1, "lambda": 0.8}),
]


def _random_method(method, params, n_models):
    """The method's jitted leaf (stacked, weights, base, key) -> merge, the jitted sampler of the
    keep-masks that the leaf draws, (stacked, base, key) -> [N, ...] masks, and its parameters."""
    spec = methods.get(method)
    resolved = spec.resolve(params, n_models, True)
    leaf = jax.jit(lambda s, w, b, k: spec.leaf(s, w, b, key=k, **resolved))
    sparsification = task_arithmetic_methods.VARIANTS[method].sparsification
    trim = {name: resolved[name] for name in ("density", "epsilon") if name in resolved}
    sample = lambda s, b, k: task_arithmetic.keep_masks(
        sparsification, k, task_arithmetic.task_vectors(s, b), **trim
    )
    return leaf, jax.jit(sample), resolved


@pytest.mark.parametrize("method,params,shape", _on_every_shape(RANDOM))
def test_random_methods_equal_mergekit_given_the_same_masks(method, params, shape, monkeypatch):
    models, weights, base = _inputs(7, shape, 3, True)
    stacked, w, b = jnp.asarray(models), jnp.asarray(weights), jnp.asarray(base)
    key = jax.random.key(11)
    leaf, sample, resolved = _random_method(method, params, 3)
    ours = leaf(stacked, w, b, key)
    masks = np.asarray(sample(stacked, b, key))

    asked = []

    def bernoulli_with_our_masks(probabilities, *args, **kwargs):
        asked.append(probabilities.clone())
        return torch.tensor(masks[len(asked) - 1], dtype=probabilities.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli_with_our_masks)
    theirs = _theirs(method, models, weights, base, **params)

    assert len(asked) == 3
    densities = task_arithmetic.per_model(resolved["density"], 3)
    for i, probabilities in enumerate(asked):
        if method.startswith("dare"):
            expected = np.full(shape, densities[i], np.float32)
        else:
            epsilon = task_arithmetic.per_model(resolved["epsilon"], 3)[i]
            delta = jnp.asarray(models[i]) - b
            expected = sparsify.della_keep_probabilities(delta, densities[i], epsilon)
        np.testing.assert_allclose(probabilities.numpy().reshape(shape), expected, atol=1e-7)
    assert np.max(np.abs(np.asarray(ours) - theirs)) <= TOLERANCE + _rescale_bound(
        theirs - base, shape
    )


def _rescale_bound(merged_delta: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far two float32 L1 rescales of a task vector of `shape` may differ: each factor is a
    ratio of two sums of positive terms, ours summed along chains of one chunk's length c and
    then a tree over the K chunks (`sparsify.l1_chunk_sums`), so each sum is within
    (c + log2 K) u of the exact one (u = 2^-24), each ratio within twice that, and the two
    implementations' within four times that, times the merged task vector's size."""
    last = shape[-1]
    chunk = last // chunks_per_row(last)
    chunks = np.prod(shape) // chunk
    return 4 * (chunk + np.log2(chunks)) * 2.0**-24 * float(np.max(np.abs(merged_delta)))


@pytest.mark.parametrize(
    "method,params",
    [("dare_linear", {"density": 0.3}), ("della_linear", {"density": 0.5, "epsilon": 0.3})],
)
def test_random_methods_match_mergekit_in_distribution(method, params):
    """Keep rates and the L1 rescaling agree with mergekit's (torch's generator) over many draws.

    Keep rates: over D entries and M draws each model keeps a binomial count, tested against its
    expectation at 5 standard deviations (for DELLA separately on the lower and the upper half of
    magnitude ranks, whose keep probabilities differ by epsilon). Rescaling: the mean merge over M
    draws, entry by entry, ours against mergekit's, within 5 standard errors of the difference.
    """
    draws, shape = 200, (12, 20)
    models, weights, base = _inputs(3, shape, 3, True)
    stacked, w, b = jnp.asarray(models), jnp.asarray(weights), jnp.asarray(base)
    keys = jax.random.split(jax.random.key(5), draws)
    leaf, sample, _ = _random_method(method, params, 3)
    ours = np.stack([leaf(stacked, w, b, k) for k in keys]).astype(np.float64)
    our_masks = np.stack([sample(stacked, b, k) for k in keys])

    torch.manual_seed(0)
    theirs = np.stack([_theirs(method, models, weights, base, **params) for _ in range(draws)])
    their_masks = np.stack([_mergekit_masks(method, models, base, params) for _ in range(draws)])

    for i in range(3):
        delta = models[i] - base
        expected = np.asarray(_keep_probabilities(method, delta, params))
        ranks = np.argsort(np.argsort(np.abs(delta), axis=1), axis=1)
        for half in (ranks < shape[1] // 2, ranks >= shape[1] // 2):
            p = expected[half]
            sigma = np.sqrt(draws * np.sum(p * (1 - p)))
            for masks in (our_masks[:, i], their_masks[:, i]):
                assert abs(masks[:, half].sum() - draws * p.sum()) <= 5 * sigma

    standard_error = np.sqrt((ours.var(0) + theirs.var(0)) / draws)
    assert np.all(np.abs(ours.mean(0) - theirs.mean(0)) <= 5 * standard_error + 1e-6)


def _keep_probabilities(method, delta, params):
    if method.startswith("dare"):
        return np.full(delta.shape, params["density"])
    return sparsify.della_keep_probabilities(
        jnp.asarray(delta), params["density"], params["epsilon"]
    )


def _mergekit_masks(method, models, base, params):
    """mergekit's own keep-masks for each model (its sparsifier without rescaling)."""
    kind = (
        SparsificationMethod.random
        if method.startswith("dare")
        else SparsificationMethod.della_magprune
    )
    extra = {"epsilon": params["epsilon"]} if "epsilon" in params else {}
    return np.stack(
        [
            mergekit_sparsify(torch.from_numpy(m - base), params["density"], kind, **extra).numpy()
            != 0
            for m in models
        ]
    )


# karcher: mergekit iterates with equal weights to tol 1e-5 (at most 10 steps) in the storage dtype.


def _mergekit_karcher(sources):
    tensors = [torch.from_numpy(np.asarray(s, np.float32)).to(_torch_dtype(s)) for s in sources]
    return merge_tensors(tensors, "karcher").to(torch.float64).numpy()


def _torch_dtype(array):
    return torch.bfloat16 if array.dtype == ml_dtypes.bfloat16 else torch.float32


@pytest.mark.parametrize("cosine", [0.9, 0.5])
@pytest.mark.parametrize("n", [3, 5])
def test_karcher_equals_mergekit_to_its_tolerance_with_equal_weights(cosine, n):
    """mergekit stops once its tangent norm is below 1e-5; both results then lie within
    (r_mergekit + r_ours) / lambda of the true mean, r being each one's first-order residual."""
    rng = np.random.default_rng(n)
    sources = sources_with_cosine(rng, n, (24, 40), cosine, rng.uniform(1.0, 4.0, n))
    sources = sources.astype(np.float32)
    equal = np.ones(n)
    ours = _ours("karcher", sources, None)
    theirs = _mergekit_karcher(sources)
    residual_theirs = first_order_residual(theirs, sources, equal)
    residual_ours = first_order_residual(ours, sources, equal)
    assert residual_theirs <= MERGEKIT_KARCHER_TOL  # mergekit reached its tolerance
    bound = (residual_theirs + residual_ours) / curvature_bound(sources, equal) + 2e-6
    assert bound <= 3 * MERGEKIT_KARCHER_TOL
    assert relative_error(ours, theirs) <= bound


def test_karcher_honours_weights_where_mergekit_cannot():
    """mergekit's karcher takes no weights (equal alphas); ours solves the weighted condition."""
    rng = np.random.default_rng(1)
    sources = sources_with_cosine(rng, 3, (24, 40), 0.5).astype(np.float32)
    weights = np.array([0.2, 1.0, 3.0])
    with pytest.raises(TypeError, match="weight"):
        merge_tensors(
            [torch.from_numpy(s) for s in sources], "karcher", parameters={"weight": list(weights)}
        )
    ours = _ours("karcher", sources, weights)
    theirs = _mergekit_karcher(sources)
    assert first_order_residual(ours, sources, weights) <= 1e-5
    assert first_order_residual(theirs, sources, weights) >= 1e-2


def test_karcher_of_bfloat16_sources_is_closer_to_the_float64_mean_than_mergekits():
    """We iterate in float32 and round once; mergekit iterates on bfloat16 unit vectors."""
    rng = np.random.default_rng(2)
    sources = sources_with_cosine(rng, 4, (24, 40), 0.5, [1.0, 2.0, 3.0, 4.0])
    sources = sources.astype(ml_dtypes.bfloat16)
    reference = karcher_reference(sources.astype(np.float64))
    ours = _ours("karcher", sources, None)
    assert ours.dtype == ml_dtypes.bfloat16
    rounding = relative_error(reference.astype(ml_dtypes.bfloat16), reference)
    ours_error = relative_error(ours, reference)
    assert ours_error <= 1.01 * rounding  # the float64 mean, rounded once to bfloat16
    assert relative_error(_mergekit_karcher(sources), reference) >= 1.3 * ours_error


def test_karcher_iterates_to_convergence_where_mergekits_ten_steps_stop_short():
    """Three sources spread over a great sphere (pairwise angles 120, 80 and 150 degrees): the
    fixed point converges slowly; mergekit stops after 10 steps far from its tolerance."""
    angles = np.radians([120.0, 80.0, 150.0])
    c12, c13, c23 = np.cos(angles)
    gram = np.array([[1.0, c12, c13], [c12, 1.0, c23], [c13, c23, 1.0]])
    basis = np.linalg.qr(np.random.default_rng(3).standard_normal((960, 3)))[0]
    directions = np.linalg.cholesky(gram) @ basis.T
    sources = (directions * np.array([[2.0], [3.0], [4.0]])).reshape(3, 24, 40)
    sources = sources.astype(np.float32)
    equal = np.ones(3)
    reference = karcher_reference(sources, equal)
    ours = _ours("karcher", sources, None)
    theirs = _mergekit_karcher(sources)
    assert first_order_residual(theirs, sources, equal) >= 10 * MERGEKIT_KARCHER_TOL
    assert first_order_residual(ours, sources, equal) <= 2e-6
    assert relative_error(ours, reference) <= 1e-5
    assert relative_error(theirs, reference) >= 100 * relative_error(ours, reference)
