"""Merges on a mesh of the 8 virtual CPU devices equal the one-device merge, each device holding
and reading only its rows; `jkarcher.merge(..., mesh=)` places unsharded leaves on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_checkpoints import (
    assert_close_trees,
    make_models,
    merge_checkpoints,
    merge_config,
    read_all,
)
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jkarcher
from jkarcher import pipeline
from jkarcher.config import ConfigError, validate
from jkarcher.io import safetensors_io
from jkarcher.io.writer import save_checkpoint, write_json
from jkarcher.merge import split_params, traced_arguments
from jkarcher.sharding import MeshError, make_mesh, padded_shape, row_sharding

TOLERANCE = 1e-6


def _merge(models, output, **fields):
    plan, _ = merge_checkpoints(models, output, **fields)
    return plan, read_all(output)


def _assert_close(got, want):
    assert_close_trees(got, want, TOLERANCE)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three float32 experts and a base; model 1 has a smaller vocabulary (60 of 64 rows), so
    the embeddings merge 60 rows (padded on a mesh of 8) and copy the base's last 4."""
    root = tmp_path_factory.mktemp("zoo")
    *experts, base = make_models(root, n=4, vocab_sizes=[64, 60, 64, 64], dtype=np.float32)
    return experts, base


@pytest.mark.parametrize(
    ("method", "mesh"),
    [
        ("karcher", "devices:8"),
        ("karcher", "devices:3"),
        ("karcher", "data:2,model:4"),
        ("dare_ties", "devices:8"),
        ("dare_ties", "devices:3"),
    ],
)
def test_merge_on_a_mesh_equals_one_device(tmp_path, zoo, method, mesh):
    experts, base = zoo
    fields = dict(method=method, base_model=str(base), dtype="float32")
    _, one = _merge(experts, tmp_path / "one", **fields)
    plan, sharded = _merge(experts, tmp_path / "mesh", mesh=mesh, **fields)
    assert plan.mesh.size == int(np.prod([int(a.split(":")[1]) for a in mesh.split(",")]))
    _assert_close(sharded, one)


def test_each_device_reads_only_its_rows(tmp_path, zoo, monkeypatch):
    experts, _ = zoo
    reads = []

    def recorded_read(info):
        reads.append((info.file, info.start, info.end))
        return read_tensor(info)

    read_tensor = safetensors_io.read_tensor
    monkeypatch.setattr(safetensors_io, "read_tensor", recorded_read)
    plan, _ = merge_checkpoints(experts, tmp_path / "out", mesh="devices:8")
    assert len(reads) == len(set(reads)), "a byte range was read twice"
    assert sum(end - start for _, start, end in reads) == plan.bytes_to_read
    for info in (source for task in plan.tasks for source in task.sources):
        blocks = [e - s for f, s, e in reads if f == info.file and info.start <= s < info.end]
        rows = info.shape[0]
        assert len(blocks) == 8 and max(blocks) <= -(-rows // 8) * (info.nbytes // rows), info


def test_a_tensor_larger_than_a_device_share_merges(tmp_path):
    """Four 4096 x 256 float32 sources stack to 16 MiB; with a budget of 4 MiB per device, one
    device could not merge them, a mesh of 8 does, and the result is the one-device one."""
    shape, n_models = (4096, 256), 4
    rng = np.random.default_rng(0)
    models = []
    for i in range(n_models):
        models.append(tmp_path / f"m{i}")
        save_checkpoint(models[-1], {"big.weight": rng.standard_normal(shape, np.float32)})
        write_json(models[-1] / "config.json", {"model_type": "test"})
    stacked_bytes = n_models * np.prod(shape) * 4
    budget = stacked_bytes // 4
    plan, sharded = _merge(models, tmp_path / "mesh", mesh="devices:8", dtype="float32")
    one_device = make_mesh((("devices", 1),))
    assert _device_bytes(plan, plan.mesh) <= budget < _device_bytes(plan, one_device)
    _, one = _merge(models, tmp_path / "one", dtype="float32")
    _assert_close(sharded, one)


def _device_bytes(plan, mesh):
    """Bytes one device needs for the merge of the plan's single tensor: arguments, result and
    scratch of its compiled leaf, as XLA reports them."""
    (task,) = plan.tasks
    static, traced = split_params(plan.method.name, task.settings.params)
    traced = traced_arguments(traced)
    fn = pipeline.placed_leaf(plan.method.name, static, task.shape, task.out_dtype, mesh)
    shape = padded_shape(task.shape, mesh)
    source = jax.ShapeDtypeStruct(shape, task.source_dtype, sharding=row_sharding(mesh, 2))
    weights = jnp.ones(len(task.sources))
    compiled = fn.lower((source,) * len(task.sources), weights, None, None, (), traced).compile()
    usage = compiled.memory_analysis()
    return usage.argument_size_in_bytes + usage.output_size_in_bytes + usage.temp_size_in_bytes


def test_mesh_errors_name_the_field(tmp_path, zoo):
    experts, _ = zoo
    with pytest.raises(ConfigError, match=r"mesh: axes \{'devices': 16\} need 16 devices, there"):
        pipeline.plan_merge(validate(merge_config(experts, tmp_path / "o", mesh="devices:16")))
    with pytest.raises(MeshError, match="8 devices do not divide by 3"):
        make_mesh((("data", 3), ("model", -1)))
    assert make_mesh((("data", 2), ("model", -1))).shape == {"data": 2, "model": 4}
    assert make_mesh(None).shape == {"devices": 8}


def test_mesh_and_format_fields_are_checked_with_the_field_named(tmp_path):
    config = merge_config([tmp_path / "a"], tmp_path / "out", mesh="data:2, model:-1")
    checked = validate(config)
    assert checked.mesh == (("data", 2), ("model", -1)) and checked.format == "safetensors"
    assert validate(checked.to_dict() | {"mesh": {"data": 2, "model": -1}}) == checked
    for mesh, message in [
        ("data", "mesh: cannot read 'data'"),
        ("data:0", "mesh.data: must be a size >= 1, or -1, got 0"),
        ("data:two", "mesh.data: must be a size >= 1, or -1, got 'two'"),
        ("a:-1,b:-1", "mesh: at most one axis may have size -1"),
        ("2d:2", "mesh: axis name '2d' is not a Python identifier"),
    ]:
        config.mesh = mesh
        with pytest.raises(ConfigError, match=message):
            validate(config)
    config.mesh, config.format = None, "npz"
    with pytest.raises(ConfigError, match="format: must be one of safetensors, orbax, got 'npz'"):
        validate(config)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_merge_places_unsharded_leaves_on_a_mesh(axis_type):
    mesh = Mesh(np.array(jax.devices()), ("x",), axis_types=(axis_type,))
    rng = np.random.default_rng(0)
    shapes = {"rows": (64, 24), "cube": (5, 16, 8), "odd": (7, 3), "scalar": ()}
    trees = [
        {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        for _ in range(3)
    ]
    columns = NamedSharding(mesh, P(None, "x"))
    for tree in trees:
        tree["columns"] = jax.device_put(rng.standard_normal((4, 16), np.float32), columns)
    merged = jkarcher.merge(trees, [1.0, 2.0, 3.0], mesh=mesh)
    expected = jkarcher.merge([jax.tree.map(np.asarray, t) for t in trees], [1.0, 2.0, 3.0])
    specs = {
        "rows": P("x", None),
        "cube": P(None, "x", None),
        "odd": P(),
        "scalar": P(),
        "columns": P(None, "x"),
    }
    for name, spec in specs.items():
        assert merged[name].sharding.spec == spec, name
        assert merged[name].sharding.mesh.shape == mesh.shape
    _assert_close(jax.tree.map(np.asarray, merged), jax.tree.map(np.asarray, expected))
