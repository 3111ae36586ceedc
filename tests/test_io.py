"""Reading and writing HF checkpoints: headers, shards, hub cache, refusals."""

import itertools
import json
import os
import pickle
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers_checkpoints import make_models, read_all, tiny_config, tiny_weights, write_tiny
from safetensors import safe_open

from jkarcher.io import Checkpoint, CheckpointError, read_header, read_tensor
from jkarcher.io.buffers import BUFFER_ALIGNMENT
from jkarcher.io.hf import output_model_config
from jkarcher.io.safetensors_io import INDEX_NAME
from jkarcher.io.writer import (
    OutputTensor,
    ShardWriter,
    WriteBehind,
    natural_key,
    plan_shards,
    save_checkpoint,
)

MIXED = {
    "a.float32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "b.float16": np.linspace(-2, 2, 5, dtype=np.float16),
    "c.int64": np.arange(6, dtype=np.int64).reshape(2, 3),
    "d.bool": np.array([True, False, True]),
    "e.scalar": np.array(3.5, dtype=np.float32),
}


def _assert_same_tensors(got: dict, want: dict):
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_save_and_read_back_every_dtype(tmp_path):
    save_checkpoint(tmp_path, MIXED)
    _assert_same_tensors(read_all(tmp_path), MIXED)


def test_written_files_read_by_the_safetensors_library(tmp_path):
    save_checkpoint(tmp_path, MIXED)
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        _assert_same_tensors({name: f.get_tensor(name) for name in f.keys()}, MIXED)


def test_bfloat16_round_trip(tmp_path):
    weights = tiny_weights(tiny_config(), seed=3)
    save_checkpoint(tmp_path, weights)
    _assert_same_tensors(read_all(tmp_path), weights)
    assert read_all(tmp_path)["model.norm.weight"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_sharded_round_trip_with_index(tmp_path):
    save_checkpoint(tmp_path, MIXED, max_shard_bytes=40)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (tmp_path / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in MIXED.values())
    checkpoint = Checkpoint(tmp_path)
    assert len(checkpoint.files) == len(files)
    _assert_same_tensors(read_all(tmp_path), MIXED)


def test_plan_shards_respects_the_size_and_keeps_order():
    sizes = [4, 4, 9, 1]
    tensors = [OutputTensor(f"t{i}", np.dtype(np.float32), (n,)) for i, n in enumerate(sizes)]
    shards = plan_shards(tensors, max_bytes=32)
    assert [[t.name for t in s.tensors] for s in shards] == [["t0", "t1"], ["t2"], ["t3"]]
    assert [s.file_name for s in shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    (single,) = plan_shards(tensors, max_bytes=10**9)
    assert single.file_name == "model.safetensors" and len(single.tensors) == 4


def test_header_is_padded_and_offsets_are_contiguous(tmp_path):
    save_checkpoint(tmp_path, MIXED)
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    ranges = sorted(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert ranges[0][0] == 0 and ranges[-1][1] == len(raw) - 8 - length
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))


def test_shard_writer_refuses_out_of_plan_writes(tmp_path):
    (shard,) = plan_shards([OutputTensor("x", np.dtype(np.float32), (2, 3))], max_bytes=100)
    with ShardWriter(tmp_path, [shard]) as writer:
        with pytest.raises(ValueError, match="'y' was not planned"):
            writer.write("y", np.zeros((2, 3), np.float32))
        with pytest.raises(ValueError, match="dtype"):
            writer.write("x", np.zeros((2, 3), np.float16))
        with pytest.raises(ValueError, match="bytes"):
            writer.write("x", np.zeros((3, 3), np.float32))
        writer.write("x", np.zeros((1, 3), np.float32), np.ones((1, 3), np.float32))
        with pytest.raises(ValueError, match="'x' was written already"):
            writer.write("x", np.zeros((2, 3), np.float32))
    np.testing.assert_array_equal(read_all(tmp_path)["x"], [[0, 0, 0], [1, 1, 1]])
    with pytest.raises(ValueError, match="never written"):
        with ShardWriter(tmp_path, [shard]):
            pass


def test_tensors_written_in_any_order_from_a_thread_and_thread_errors_raised(tmp_path):
    layout = [OutputTensor(f"t{i}", np.dtype(np.float32), (3,)) for i in range(4)]
    shards = plan_shards(layout, max_bytes=24)
    with ShardWriter(tmp_path, shards) as writer, WriteBehind(writer, depth=1) as behind:
        for i in (2, 0, 3, 1):
            behind.write(f"t{i}", np.full(3, i, np.float32))
    assert {k: v.tolist() for k, v in read_all(tmp_path).items()} == {
        f"t{i}": [i, i, i] for i in range(4)
    }
    (tmp_path / "again").mkdir()
    with pytest.raises(ValueError, match="'t9' was not planned"):
        with ShardWriter(tmp_path / "again", shards) as writer, WriteBehind(writer) as behind:
            behind.write("t9", np.zeros(3, np.float32))


def test_rows_reads_a_block_of_rows(tmp_path):
    values = np.arange(40, dtype=np.float32).reshape(10, 4)
    save_checkpoint(tmp_path, {"m": values})
    info = Checkpoint(tmp_path).info("m")
    np.testing.assert_array_equal(read_tensor(info.rows(3, 7)), values[3:7])
    with pytest.raises(ValueError, match="no rows"):
        info.rows(5, 11)


def test_read_tensor_buffers_are_aligned(tmp_path):
    save_checkpoint(tmp_path, MIXED)
    checkpoint = Checkpoint(tmp_path)
    for name in checkpoint.names():
        assert checkpoint.read(name).ctypes.data % BUFFER_ALIGNMENT == 0


def test_natural_key_orders_layer_numbers():
    names = ["model.layers.10.w", "model.layers.2.w", "lm_head.weight", "model.layers.1.w"]
    assert sorted(names, key=natural_key) == [
        "lm_head.weight",
        "model.layers.1.w",
        "model.layers.2.w",
        "model.layers.10.w",
    ]


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        Checkpoint(tmp_path / "nowhere")


def test_corrupt_header_names_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + b"\0" * 16)
    with pytest.raises(CheckpointError, match="corrupt safetensors header") as err:
        Checkpoint(tmp_path)
    assert str(path) in str(err.value)


def test_truncated_file_names_the_file_and_tensor(tmp_path):
    save_checkpoint(tmp_path, MIXED)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])  # cuts into d.bool (3 bytes) and e.scalar (4)
    with pytest.raises(CheckpointError, match="truncated") as err:
        read_header(path)
    assert str(path) in str(err.value) and "tensor 'd.bool'" in str(err.value)


def test_tiny_file_is_not_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint(tmp_path)


class _LeavesAMark:
    """Unpickling this creates the file `path`: proof that a pickle was loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (Path(self.path),)


def test_pickled_weights_are_refused_and_never_unpickled(tmp_path):
    mark = tmp_path / "unpickled"
    model = tmp_path / "model"
    model.mkdir()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_LeavesAMark(mark)))
    (model / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="pickled") as err:
        Checkpoint(model)
    assert "pytorch_model.bin" in str(err.value) and "safetensors" in str(err.value)
    assert not mark.exists()


def test_index_that_names_a_missing_shard(tmp_path):
    save_checkpoint(tmp_path, MIXED, max_shard_bytes=40)
    next(tmp_path.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Checkpoint(tmp_path)


def _fake_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay out `source`'s files as the HF hub cache does: blobs, a snapshot of links, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_id_resolves_from_the_local_cache(tmp_path, monkeypatch):
    (source,) = make_models(tmp_path / "src", n=1)
    snapshot = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-qwen", source)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    checkpoint = Checkpoint("someorg/tiny-qwen")
    assert checkpoint.path == snapshot
    assert checkpoint.config["model_type"] == "qwen2"
    _assert_same_tensors(read_all(snapshot), read_all(source))


def test_hub_id_under_hf_home(tmp_path, monkeypatch):
    (source,) = make_models(tmp_path / "src", n=1)
    snapshot = _fake_hub_cache(tmp_path / "home" / "hub", "someorg/tiny-qwen", source)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert Checkpoint("someorg/tiny-qwen").path == snapshot


def test_hub_id_not_in_cache_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="local Hugging Face cache") as err:
        Checkpoint("someorg/absent")
    assert "network" in str(err.value)


def test_a_single_snapshot_without_refs_main_is_used(tmp_path, monkeypatch):
    (source,) = make_models(tmp_path / "src", n=1)
    snapshot = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-qwen", source)
    (snapshot.parent.parent / "refs" / "main").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert Checkpoint("someorg/tiny-qwen").path == snapshot


def test_several_snapshots_without_refs_main_are_listed(tmp_path, monkeypatch):
    """Not "not found": the error names each snapshot and says how to choose one."""
    (source,) = make_models(tmp_path / "src", n=1)
    snapshot = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-qwen", source)
    repo = snapshot.parent.parent
    (repo / "snapshots" / "fedcba9876").mkdir()
    (repo / "refs" / "main").unlink()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="2 snapshots") as err:
        Checkpoint("someorg/tiny-qwen")
    message = str(err.value)
    assert "\n" not in message and "'someorg/tiny-qwen'" in message
    assert f"({snapshot.name}, fedcba9876)" in message
    assert "pass one snapshot directory" in message and "refs/main" in message
    assert "not found" not in message


def test_refs_main_naming_a_missing_snapshot_says_so(tmp_path, monkeypatch):
    (source,) = make_models(tmp_path / "src", n=1)
    snapshot = _fake_hub_cache(tmp_path / "hub", "someorg/tiny-qwen", source)
    ref = snapshot.parent.parent / "refs" / "main"
    ref.write_text("feedface")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(CheckpointError, match="names snapshot 'feedface', which is not in") as err:
        Checkpoint("someorg/tiny-qwen")
    assert str(ref) in str(err.value) and snapshot.name in str(err.value)


def test_corrupt_model_config(tmp_path):
    save_checkpoint(tmp_path, MIXED)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json: unreadable model config"):
        Checkpoint(tmp_path)


def test_output_model_config_states_dtype_and_tying():
    source = {"model_type": "qwen2", "torch_dtype": "float32", "tie_word_embeddings": False}
    config = output_model_config(source, "bfloat16", tie_embeddings=True)
    assert config == {
        "model_type": "qwen2",
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "tie_word_embeddings": True,
    }
    assert source["torch_dtype"] == "float32"


def test_write_tiny_makes_a_complete_hf_directory(tmp_path):
    config = tiny_config(tie=True)
    path = write_tiny(tmp_path / "m", tiny_weights(config, 0), config)
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert "lm_head.weight" not in Checkpoint(path).names()
