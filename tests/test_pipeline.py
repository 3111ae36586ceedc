"""The streaming pipeline on tiny Qwen2-layout checkpoints: values equal `jkarcher.merge`, the
output loads in transformers, and every kind of bad input fails before an output appears."""

import json
import threading
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers_checkpoints import (
    assert_equal_trees,
    make_models,
    merge_checkpoints,
    merge_config,
    read_all,
    tiny_config,
    tiny_weights,
    write_fisher,
    write_grams,
    write_tiny,
)
from karcher_reference import karcher_reference

import jkarcher
from jkarcher import demo, methods, pipeline
from jkarcher.config import validate
from jkarcher.io import CheckpointError, safetensors_io
from jkarcher.io.output_dir import OutputError
from jkarcher.io.safetensors_io import INDEX_NAME, read_header, read_tensor
from jkarcher.io.writer import natural_key, save_checkpoint
from jkarcher.merge import MergeError, leaf_key
from jkarcher.methods.registry import BASE_NONE, BASE_REQUIRED, REQUIRED, MergeMethod
from jkarcher.pipeline import read as pipeline_read

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"


def _expected(models, *, weights=None, base=None, **kwargs):
    """What `jkarcher.merge` gives on the same arrays."""
    trees = [read_all(p) for p in models]
    base_tree = None if base is None else read_all(base)
    return jkarcher.merge(trees, weights, base=base_tree, **kwargs)


def _entries(directory):
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def transformers_model():
    """Load a checkpoint directory with transformers and return finite-checked logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    def logits(directory):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory)
        assert transformers.AutoTokenizer.from_pretrained(directory)("merge")["input_ids"]
        with torch.no_grad():
            return model(torch.arange(12)[None] % 60).logits.float().numpy()

    return logits


def test_end_to_end_loads_in_transformers_and_equals_merge(tmp_path, transformers_model):
    models = make_models(tmp_path, n=3)
    out = tmp_path / "merged"
    plan, summary = merge_checkpoints(models, out, dtype="bfloat16")
    assert not plan.warnings
    assert_equal_trees(read_all(out), _expected(models))
    logits = transformers_model(out)
    assert logits.shape[-1] == 64 and np.isfinite(logits).all()
    assert _entries(out) == [
        ".jkarcher-output.json",
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    assert "- karcher" in (out / "README.md").read_text()
    assert summary.tensors == len(plan.tasks) == 15
    assert summary.bytes_read == sum(read_tensor(i).nbytes for t in plan.tasks for i in t.sources)
    assert summary.bytes_written == sum(a.nbytes for a in read_all(out).values())


def test_weights_and_base_model_match_merge(tmp_path):
    models = make_models(tmp_path, n=4)
    *experts, base = models
    merge_checkpoints(experts, tmp_path / "lin", method="linear", weights=[1.0, 2.0, 0.5])
    assert_equal_trees(
        read_all(tmp_path / "lin"), _expected(experts, weights=[1.0, 2.0, 0.5], method="linear")
    )
    merge_checkpoints(experts, tmp_path / "tv", base_model=str(base), params={"block": "row"})
    assert_equal_trees(read_all(tmp_path / "tv"), _expected(experts, base=base, block="row"))


def _method_cases():
    cases = []
    for name in methods.names():
        spec = methods.get(name)
        required = [p.name for p in spec.params if p.default is REQUIRED]
        marks = [pytest.mark.slow]
        if required:
            marks.append(pytest.mark.skip(reason=f"needs values for {required}"))
        cases.append(pytest.param(name, marks=marks))
    return cases


@pytest.mark.parametrize("method", _method_cases())
def test_every_registered_method_equals_merge(tmp_path, method):
    spec = methods.get(method)
    n = max(spec.min_models, min(3, spec.max_models or 3))
    *models, base = make_models(tmp_path, n=n + 1)
    use_base = spec.base == BASE_REQUIRED
    fields = {"method": method, "seed": 5}
    if use_base:
        fields["base_model"] = str(base)
    inputs = {}
    if spec.tensor_inputs_required:
        (name,) = spec.tensor_inputs
        write = write_fisher if name == "fisher" else write_grams
        inputs[name] = [write(m, seed) for seed, m in enumerate(models)]
        fields["params"] = {name: "beside"}
    merge_checkpoints(models, tmp_path / "out", **fields)
    key = jax.random.key(5) if spec.random else None
    want = _expected(models, base=base if use_base else None, method=method, key=key, **inputs)
    assert_equal_trees(read_all(tmp_path / "out"), want)


def test_random_methods_get_a_key_per_tensor(tmp_path, request):
    def noise(stacked, weights, base=None, *, key=None):
        return jax.random.uniform(key, stacked.shape[1:], jnp.float32).astype(stacked.dtype)

    spec = MergeMethod("noise_probe", noise, base=BASE_NONE, random=True)
    methods.register(spec)
    request.addfinalizer(lambda: methods.unregister(spec.name))
    models = make_models(tmp_path, n=2)
    merge_checkpoints(models, tmp_path / "out", method="noise_probe", seed=11)
    got = read_all(tmp_path / "out")
    for name, value in got.items():
        want = jax.random.uniform(leaf_key(jax.random.key(11), name), value.shape, jnp.float32)
        np.testing.assert_array_equal(value, np.asarray(want.astype(value.dtype)), err_msg=name)
    assert not np.array_equal(got[EMBED][:8], got["model.norm.weight"][:8])


def test_plan_reads_headers_only(tmp_path, monkeypatch):
    models = make_models(tmp_path, n=2)

    def no_reading(info):
        raise AssertionError(f"the plan read {info.name}")

    monkeypatch.setattr(safetensors_io, "read_tensor", no_reading)
    plan = pipeline.plan_merge(validate(merge_config(models, tmp_path / "out")))
    first_layer = "model.layers.0.input_layernorm.weight"
    assert [t.name for t in plan.tasks][:3] == [HEAD, EMBED, first_layer]
    assert all(len(t.sources) == 2 for t in plan.tasks)


def test_merge_order_groups_by_leaf_while_files_keep_name_order(tmp_path):
    models = make_models(tmp_path, n=2)
    plan, _ = merge_checkpoints(models, tmp_path / "out")
    order = pipeline.execution_order(plan)
    assert sorted(t.name for t in order) == sorted(t.name for t in plan.tasks)
    signatures = [pipeline.leaf_signature(plan.method.name, t) for t in order]
    runs = [s for i, s in enumerate(signatures) if i == 0 or s != signatures[i - 1]]
    assert len(runs) == len(set(signatures)) < len(order)
    (shard,) = plan.shards
    names = [t.name for t in shard.tensors]
    assert names == sorted(names, key=natural_key) == [t.name for t in plan.tasks]
    header = read_header(tmp_path / "out" / "model.safetensors")[0]
    assert sorted(header, key=lambda n: header[n].start) == names


def test_sharded_inputs_and_outputs(tmp_path, transformers_model):
    models = make_models(tmp_path / "in", n=2, max_shard_bytes=1500)
    assert all((p / INDEX_NAME).is_file() for p in models)
    plan, _ = merge_checkpoints(models, tmp_path / "out", out_shard_size="1200")
    out = tmp_path / "out"
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) == len(plan.shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(files)
    assert all(s.nbytes <= 1200 or len(s.tensors) == 1 for s in plan.shards)
    assert_equal_trees(read_all(out), _expected(models))
    assert np.isfinite(transformers_model(out)).all()


def test_tied_embeddings_stay_tied(tmp_path, transformers_model):
    models = make_models(tmp_path, n=2, ties=[True, True])
    plan, _ = merge_checkpoints(models, tmp_path / "out")
    out = tmp_path / "out"
    assert plan.tie_embeddings and not plan.warnings
    assert HEAD not in read_all(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_equal_trees(read_all(out), _expected(models))
    assert np.isfinite(transformers_model(out)).all()


def test_a_tying_model_gives_its_embedding_as_lm_head(tmp_path):
    models = make_models(tmp_path, n=3, ties=[False, True, False])
    with pytest.raises(MergeError, match=r"architectures differ \(tied embeddings"):
        merge_checkpoints(models, tmp_path / "out")
    plan, _ = merge_checkpoints(models, tmp_path / "out", allow_crimes=True)
    assert not plan.tie_embeddings
    assert any(w.startswith("allow_crimes: merging models") for w in plan.warnings)
    assert any("model 1" in w and "ties lm_head" in w for w in plan.warnings)
    trees = [read_all(p) for p in models]
    trees[1][HEAD] = trees[1][EMBED]
    assert_equal_trees(read_all(tmp_path / "out"), jkarcher.merge(trees))


def test_an_untied_lm_head_is_dropped_when_the_reference_ties(tmp_path):
    models = make_models(tmp_path, n=2, ties=[True, False])
    plan, _ = merge_checkpoints(models, tmp_path / "out", allow_crimes=True)
    assert plan.tie_embeddings and HEAD not in read_all(tmp_path / "out")
    assert any("model 1" in w and "not used" in w for w in plan.warnings)


@pytest.mark.parametrize("vocab_sizes", [[72, 64, 80], [64, 72, 64]])
def test_vocabulary_sizes_that_differ(tmp_path, vocab_sizes):
    models = make_models(tmp_path, n=3, vocab_sizes=vocab_sizes)
    plan, _ = merge_checkpoints(models, tmp_path / "out")
    got = read_all(tmp_path / "out")
    shared, reference = min(vocab_sizes), vocab_sizes[0]
    warnings = [w for w in plan.warnings if "vocabulary sizes differ" in w]
    assert len(warnings) == 2 and all(f"first {shared} rows are merged" in w for w in warnings)
    trees = [read_all(p) for p in models]
    for tree in trees:
        tree[EMBED], tree[HEAD] = tree[EMBED][:shared], tree[HEAD][:shared]
    want = {k: np.asarray(v) for k, v in jkarcher.merge(trees).items()}
    for name in (EMBED, HEAD):
        want[name] = np.concatenate([want[name], read_all(models[0])[name][shared:]])
        assert got[name].shape == (reference, 16)
    assert_equal_trees(got, want)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == reference


def test_float_dtypes_that_differ_are_merged_in_the_wider_one(tmp_path):
    config = tiny_config()
    low = write_tiny(tmp_path / "low", tiny_weights(config, 0), config)
    high = write_tiny(tmp_path / "high", tiny_weights(config, 1, np.float32), config)
    merge_checkpoints([low, high], tmp_path / "out", dtype="float32")
    trees = [{k: v.astype(np.float32) for k, v in read_all(p).items()} for p in (low, high)]
    assert_equal_trees(read_all(tmp_path / "out"), jkarcher.merge(trees))


def _add_tensor(directory, name, value):
    tensors = read_all(directory)
    tensors[name] = value
    (directory / "model.safetensors").unlink()
    save_checkpoint(directory, tensors)


def test_integer_tensors_are_copied_when_all_agree(tmp_path):
    models = make_models(tmp_path, n=2)
    for path in models:
        _add_tensor(path, "model.position_ids", np.arange(8, dtype=np.int64))
    merge_checkpoints(models, tmp_path / "out")
    np.testing.assert_array_equal(read_all(tmp_path / "out")["model.position_ids"], np.arange(8))
    _add_tensor(models[1], "model.position_ids", np.arange(1, 9, dtype=np.int64))
    with pytest.raises(MergeError, match="'model.position_ids' is not floating point") as err:
        merge_checkpoints(models, tmp_path / "again")
    assert "model 1" in str(err.value) and str(models[1]) in str(err.value)
    assert not (tmp_path / "again").exists()


# Bad input: every case fails with a message naming what is wrong, and leaves no output.


def _assert_no_output(tmp_path, name="out"):
    assert not (tmp_path / name).exists()
    assert not list(tmp_path.glob(f".{name}*"))


def test_missing_directory(tmp_path):
    models = make_models(tmp_path, n=1)
    with pytest.raises(CheckpointError, match=r"models\[1\]: model .*nowhere.*: no such directory"):
        merge_checkpoints([*models, tmp_path / "nowhere"], tmp_path / "out")
    _assert_no_output(tmp_path)


def test_tensor_missing_in_one_model(tmp_path):
    models = make_models(tmp_path, n=3)
    tensors = read_all(models[2])
    del tensors["model.layers.0.mlp.up_proj.weight"]
    (models[2] / "model.safetensors").unlink()
    save_checkpoint(models[2], tensors)
    missing = "'model.layers.0.mlp.up_proj.weight' is missing from model 2"
    with pytest.raises(MergeError, match=missing):
        merge_checkpoints(models, tmp_path / "out")
    _assert_no_output(tmp_path)


def test_extra_tensor_in_one_model(tmp_path):
    models = make_models(tmp_path, n=2)
    _add_tensor(models[1], "model.extra.weight", np.ones(3, np.float32))
    with pytest.raises(MergeError, match="'model.extra.weight' of model 1") as err:
        merge_checkpoints(models, tmp_path / "out")
    assert str(models[1] / "model.safetensors") in str(err.value)


def test_shapes_that_differ(tmp_path):
    models = make_models(tmp_path, n=2)
    _add_tensor(models[1], "model.norm.weight", np.ones(17, np.float32))
    with pytest.raises(MergeError, match=r"'model.norm.weight' has shape \[17\] in model 1") as err:
        merge_checkpoints(models, tmp_path / "out")
    assert str(models[1] / "model.safetensors") in str(err.value)
    _assert_no_output(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_corrupt_or_truncated_safetensors(tmp_path, damage):
    models = make_models(tmp_path, n=2)
    path = models[1] / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else data[:8] + b"\xff" * 40 + data[48:])
    with pytest.raises(CheckpointError, match=r"models\[1\]: ") as err:
        merge_checkpoints(models, tmp_path / "out")
    assert str(path) in str(err.value)
    _assert_no_output(tmp_path)


def test_only_pickled_weights(tmp_path):
    models = make_models(tmp_path, n=2)
    (models[1] / "model.safetensors").rename(models[1] / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"models\[1\]: .*only pickled weights"):
        merge_checkpoints(models, tmp_path / "out")
    _assert_no_output(tmp_path)


@pytest.mark.parametrize("where", ["model", "base"])
def test_nan_in_a_source_names_tensor_model_and_file(tmp_path, where):
    *models, base = make_models(tmp_path, n=3)
    poisoned = models[1] if where == "model" else base
    tensors = read_all(poisoned)
    tensors["model.layers.0.self_attn.o_proj.weight"][2, 3] = np.nan
    (poisoned / "model.safetensors").unlink()
    save_checkpoint(poisoned, tensors)
    label = "model 1" if where == "model" else "the base model"
    with pytest.raises(MergeError, match=f"'model.layers.0.self_attn.o_proj.weight': {label}") as e:
        merge_checkpoints(models, tmp_path / "out", base_model=str(base))
    assert str(poisoned / "model.safetensors") in str(e.value) and "NaN or Inf" in str(e.value)
    _assert_no_output(tmp_path)


def test_inf_in_the_copied_vocabulary_rows(tmp_path):
    models = make_models(tmp_path, n=2, vocab_sizes=[72, 64])
    tensors = read_all(models[0])
    tensors[EMBED][70, 0] = np.inf
    (models[0] / "model.safetensors").unlink()
    save_checkpoint(models[0], tensors)
    with pytest.raises(MergeError, match=f"'{EMBED}': model 0 .* holds NaN or Inf"):
        merge_checkpoints(models, tmp_path / "out")


def test_output_inside_an_input(tmp_path):
    models = make_models(tmp_path, n=2)
    with pytest.raises(OutputError, match="inside the input model directory"):
        merge_checkpoints(models, models[0] / "merged")
    assert not (models[0] / "merged").exists()


def test_existing_output_is_refused_before_any_work(tmp_path, monkeypatch):
    models = make_models(tmp_path, n=2)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(
        safetensors_io, "read_tensor", lambda info: pytest.fail("read before refusing")
    )
    with pytest.raises(OutputError, match="already exists"):
        merge_checkpoints(models, tmp_path / "out")
    monkeypatch.undo()
    merge_checkpoints(models, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_interrupted_run_leaves_nothing_that_looks_finished(tmp_path):
    models = make_models(tmp_path, n=2)
    plan = pipeline.plan_merge(validate(merge_config(models, tmp_path / "out")))
    seen = []

    def interrupt(task):
        seen.append(_entries(tmp_path))
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(plan, on_tensor=interrupt)
    assert all("out" not in entries for entries in seen)
    assert all(any(e.startswith(".out.incomplete-") for e in entries) for entries in seen)
    _assert_no_output(tmp_path)


# Reading ahead.


class _Task:
    def __init__(self, index, read_bytes):
        self.index, self.read_bytes = index, read_bytes


def test_read_ahead_keeps_order_and_stays_within_its_budget():
    tasks = [_Task(i, n) for i, n in enumerate([10, 30, 50, 10, 10, 90, 5])]
    lock, held, peak = threading.Lock(), [0], [0]

    def read(task):
        with lock:
            held[0] += task.read_bytes
            peak[0] = max(peak[0], held[0])
        return task.index

    order = []
    with pipeline.ReadAhead(tasks, read, limit_bytes=60) as reads:
        for task, value in reads:
            order.append(value)
            with lock:
                held[0] -= task.read_bytes
    assert order == list(range(len(tasks)))
    assert peak[0] <= 90  # the limit, or one task larger than it on its own


def test_read_ahead_hands_errors_to_the_consumer_and_stops():
    def read(task):
        if task.index == 2:
            raise CheckpointError("broken file")
        return task.index

    tasks = [_Task(i, 1) for i in range(5)]
    got = []
    with pytest.raises(CheckpointError, match="broken file"):
        with pipeline.ReadAhead(tasks, read, limit_bytes=100) as reads:
            for _, value in reads:
                got.append(value)
    assert got == [0, 1]


def test_read_ahead_budget_below_the_largest_task_merges_bf16_as_merge_does(tmp_path, monkeypatch):
    """bf16 sources with a read-ahead budget between the task sizes, so the embedding and the
    head are read alone and the small tensors several at a time: the output equals
    `jkarcher.merge` bit for bit, and the embedding is the float64 Karcher mean rounded once to
    bf16 (within half a bf16 ulp, plus 1e-5 of its size for the iteration's tolerance and
    float32's roundings)."""
    models = make_models(tmp_path, n=3, num_layers=2)
    sizes = {name: a.nbytes * 3 for name, a in read_all(models[0]).items()}
    monkeypatch.setattr(pipeline_read, "READ_AHEAD_BYTES", sizes[EMBED] // 2)
    assert sorted(sizes.values())[-3] < sizes[EMBED] // 2  # the rest fit, more than one at a time
    merge_checkpoints(models, tmp_path / "out", dtype="bfloat16")
    got = read_all(tmp_path / "out")
    assert_equal_trees(got, _expected(models))
    reference = karcher_reference(np.stack([read_all(m)[EMBED] for m in models]))
    error = np.abs(got[EMBED].astype(np.float64) - reference)
    half_ulp = 2.0 ** (np.floor(np.log2(np.abs(reference))) - 8)  # bf16: 8 significant bits
    assert np.all(error <= half_ulp + 1e-5 * np.abs(reference).max())


def test_inputs_held_in_memory_stay_near_one_tensor_across_models(tmp_path, monkeypatch):
    """Input buffers alive at any moment stay within twice the largest tensor across the models
    (the one merging and the one read ahead), far below the size of the models."""
    config = demo.qwen2_config(
        64, hidden_size=16, intermediate_size=16, num_layers=6, num_heads=2, num_kv_heads=2
    )
    models = [write_tiny(tmp_path / f"m{i}", tiny_weights(config, i), config) for i in range(3)]
    live, peak = [0], [0]

    def counted_read(info):
        array = read_tensor(info)
        owner = array
        while owner.base is not None:
            owner = owner.base
        live[0] += info.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(owner, lambda: live.__setitem__(0, live[0] - info.nbytes))
        return array

    monkeypatch.setattr(safetensors_io, "read_tensor", counted_read)
    monkeypatch.setattr(pipeline_read, "READ_AHEAD_BYTES", 0)
    plan, summary = merge_checkpoints(models, tmp_path / "out")
    largest = max(t.read_bytes for t in plan.tasks)
    assert summary.bytes_read > 6 * largest
    assert largest <= peak[0] <= 2 * largest
