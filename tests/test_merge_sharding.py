"""Sharded inputs on 8 virtual CPU devices merge to the same values and keep their sharding."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from karcher_reference import relative_error

import jkarcher

SPECS = {
    "rows": ((64, 24), P("x", None)),
    "columns": ((16, 2048), P(None, "x")),
    "vector": ((24,), P(None)),
    "cube": ((5, 16, 8), P(None, "x", None)),
}


def _mesh(axis_type):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 virtual CPU devices"
    return Mesh(np.array(jax.devices()), ("x",), axis_types=(axis_type,))


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("karcher", {}),
        ("karcher", {"block": "row"}),
        ("linear", {}),
    ],
)
def test_sharded_merge_equals_unsharded_and_keeps_sharding(axis_type, method, params):
    mesh = _mesh(axis_type)
    rng = np.random.default_rng(0)
    trees = [
        {name: rng.standard_normal(shape).astype(np.float32) for name, (shape, _) in SPECS.items()}
        for _ in range(3)
    ]
    shardings = {name: NamedSharding(mesh, spec) for name, (_, spec) in SPECS.items()}
    sharded = [jax.tree.map(jax.device_put, t, shardings) for t in trees]
    merged = jkarcher.merge(sharded, [1.0, 2.0, 3.0], method=method, **params)
    expected = jkarcher.merge(trees, [1.0, 2.0, 3.0], method=method, **params)
    for name, sharding in shardings.items():
        assert merged[name].sharding.spec == sharding.spec
        assert merged[name].sharding.mesh.shape == mesh.shape
        assert relative_error(merged[name], expected[name]) <= 1e-6


@pytest.mark.parametrize(("n", "dtype"), [(4, "float32"), (16, "bfloat16")])
def test_karcher_mean_on_an_explicitly_sharded_stack(n, dtype):
    """16 bfloat16 models go model by model (`karcher.slices_in_float32`), sharded alike."""
    mesh = _mesh(AxisType.Explicit)
    stacked = np.random.default_rng(1).standard_normal((n, 32, 64)).astype(dtype)
    sharded = jax.device_put(stacked, NamedSharding(mesh, P(None, "x", None)))
    merged = jkarcher.karcher_mean(sharded, None, out_dtype=np.float32)
    assert merged.sharding.spec == P("x", None)
    expected = jkarcher.karcher_mean(stacked, None, out_dtype=np.float32)
    assert relative_error(merged, expected) <= 1e-6
