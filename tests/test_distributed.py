"""One merge by two processes with two CPU devices each (`jax.distributed`, gloo collectives on
127.0.0.1): the same checkpoint as one device, written in parts, appearing only when complete."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_checkpoints import assert_close_trees, make_models, merge_config, read_all

from jkarcher import pipeline
from jkarcher.config import ConfigError, DistributedSettings, distributed_settings, validate
from jkarcher.io.orbax_io import OrbaxCheckpoint, hf_to_orbax
from jkarcher.io.output_dir import STAGING_MARK, OutputError, staged_directory
from jkarcher.io.writer import (
    OutputTensor,
    ShardWriter,
    create_shard_files,
    plan_shards,
    save_checkpoint,
)
from jkarcher.memory import Budget
from jkarcher.pipeline import budget

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, DEVICES_EACH = 2, 2
TIMEOUT_S = 240
TOLERANCE = 1e-6


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config_file(tmp_path: Path, config) -> Path:
    """A config file giving the fields of `config` (a ConfigDict from `merge_config`) that a
    merge here sets; `distributed` keeps its defaults, for the command line to set."""
    fields = ("method", "models", "base_model", "dtype", "output", "format", "mesh", "memory")
    lines = [f"    config.{name} = {config[name]!r}" for name in fields]
    path = tmp_path / "config.py"
    path.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n    config = base_config()\n"
        + "\n".join(lines)
        + "\n    return config\n"
    )
    return path


def _run_processes(config_file: Path) -> list[tuple[int, str]]:
    """scripts/merge.py in PROCESSES processes of DEVICES_EACH CPU devices, joined through a
    coordinator on a free port of 127.0.0.1; each must end within TIMEOUT_S. Gives each one's
    exit code and output, which goes to a file beside the config (a full pipe would stall a
    process, and with it the others)."""
    address = f"127.0.0.1:{_free_port()}"
    env = os.environ | {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_EACH}",
        "JAX_PLATFORMS": "cpu",
        "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
    }
    logs = [config_file.with_name(f"process{index}.log") for index in range(PROCESSES)]
    processes = []
    for index, log in enumerate(logs):
        command = [
            sys.executable,
            str(ROOT / "scripts" / "merge.py"),
            f"--config={config_file}",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address={address}",
            f"--config.distributed.num_processes={PROCESSES}",
            f"--config.distributed.process_id={index}",
        ]
        with open(log, "w") as out:
            processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=out))
    try:
        codes = [process.wait(timeout=TIMEOUT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [(code, log.read_text()) for code, log in zip(codes, logs, strict=True)]


def _assert_close(got: dict, want: dict):
    assert_close_trees(got, want, TOLERANCE)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three float32 experts and a base; model 1's vocabulary has 62 of the 64 rows, so the
    embeddings merge 62 rows (padded to 64 over the 4 devices) and copy the base's last 2."""
    root = tmp_path_factory.mktemp("zoo")
    return make_models(root, n=4, vocab_sizes=[64, 62, 64, 64], dtype=np.float32)


def _memory_for_blocks(config, rows: int) -> str:
    """A memory budget that cuts the embedding of `config`'s merge into blocks of `rows` rows."""
    plan = pipeline.plan_merge(validate(config))
    (task,) = [t for t in plan.tasks if t.name == "model.embed_tokens.weight"]
    need = budget.task_bytes(task, plan.method, rows) + budget.statistics_bytes(task, plan.method)
    return str(Budget(0).total_for(need, 0))


@pytest.mark.parametrize(
    ("method", "format", "blocks"),
    [
        ("karcher", "safetensors", False),
        ("karcher", "safetensors", True),
        ("dare_ties", "orbax", False),
    ],
)
def test_two_processes_give_the_one_device_merge(tmp_path, zoo, method, format, blocks):
    """Each process merges its devices' rows; with a budget that cuts the embedding into blocks
    of 20 rows, each block's (the Karcher mean's two passes, their sums gathered over both)."""
    models = zoo if format == "safetensors" else [hf_to_orbax(p, tmp_path / p.name) for p in zoo]
    fields = dict(method=method, base_model=str(models[3]), dtype="float32")
    one = merge_config(zoo[:3], tmp_path / "one", **fields | {"base_model": str(zoo[3])})
    if blocks:
        fields["memory"] = _memory_for_blocks(one, 20)
    pipeline.run(pipeline.plan_merge(validate(one)))
    config = merge_config(models[:3], tmp_path / "two", format=format, mesh=None, **fields)
    for code, log in _run_processes(_config_file(tmp_path, config)):
        assert code == 0, log[-3000:]
    if format == "orbax":
        written = OrbaxCheckpoint(tmp_path / "two")
        got = {name: written.read(name) for name in written.names()}
    else:
        got = read_all(tmp_path / "two")
    _assert_close(got, read_all(tmp_path / "one"))


def test_bad_input_stops_every_process_before_an_output_appears(tmp_path, zoo):
    broken = tmp_path / "broken"
    tensors = read_all(zoo[1])
    tensors["model.norm.weight"][3] = np.nan
    save_checkpoint(broken, tensors)
    (broken / "config.json").write_bytes((zoo[1] / "config.json").read_bytes())
    config = merge_config([zoo[0], broken], tmp_path / "out", mesh=None)
    for code, log in _run_processes(_config_file(tmp_path, config)):
        assert code == 1, log[-3000:]
        assert "tensor 'model.norm.weight': model 1" in log and "holds NaN or Inf" in log
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_shared_shard_files_take_rows_from_several_writers(tmp_path):
    tensor = np.arange(40, dtype=np.float32).reshape(10, 4)
    shards = plan_shards([OutputTensor("t", tensor.dtype, tensor.shape)], 10**6)
    create_shard_files(tmp_path, shards)
    with ShardWriter(tmp_path, shards, shared=True) as first:
        first.write_rows("t", 0, tensor[:6])
    with ShardWriter(tmp_path, shards, shared=True) as second:
        second.write_rows("t", 6, tensor[6:])
        with pytest.raises(ValueError, match=r"shape \[5, 4\] at row 6 does not fit"):
            second.write_rows("t", 6, np.zeros((5, 4), np.float32))
    assert first.rows_written() == {"t": 6} and second.rows_written() == {"t": 4}
    np.testing.assert_array_equal(read_all(tmp_path)["t"], tensor)
    (tmp_path / "alone").mkdir()
    with pytest.raises(ValueError, match="tensor 't' was never written"):
        with ShardWriter(tmp_path / "alone", shards) as alone:
            alone.write_rows("t", 0, tensor[:6])


def test_missing_rows_make_the_output_incomplete(tmp_path, zoo):
    plan = pipeline.plan_merge(validate(merge_config(zoo[:2], tmp_path / "out")))
    rows = {t.name: t.shape[0] for shard in plan.shards for t in shard.tensors}
    pipeline.check_complete(plan.shards, rows)
    rows["model.norm.weight"] -= 1
    with pytest.raises(OutputError, match="15 of the 16 rows of tensor 'model.norm.weight'"):
        pipeline.check_complete(plan.shards, rows)


def test_only_the_leader_creates_and_renames_after_the_last_barrier(tmp_path):
    calls = []
    with staged_directory(
        tmp_path / "out", False, token="abc", leader=False, barrier=calls.append
    ) as staging:
        assert not staging.exists() and calls == ["staging directory created"]
    assert not (tmp_path / "out").exists()
    calls.clear()
    with staged_directory(
        tmp_path / "out", False, token="abc", leader=True, barrier=calls.append
    ) as staging:
        assert staging.name == f".out{STAGING_MARK}abc" and staging.is_dir()
        (staging / "part").write_text("rows")
    assert calls == ["staging directory created", "every part of the output written"]
    assert (tmp_path / "out" / "part").read_text() == "rows"
    calls.clear()
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "other", False, leader=True, barrier=calls.append):
            raise RuntimeError("a process failed")
    assert calls == ["staging directory created"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_distributed_settings_are_checked_with_the_field_named():
    assert distributed_settings({}) == DistributedSettings()
    given = {"enabled": True, "coordinator_address": "10.0.0.1:1234", "num_processes": 4}
    assert distributed_settings({"distributed": given}) == DistributedSettings(
        True, "10.0.0.1:1234", 4, None
    )
    for bad, message in [
        ({"process_id": 1}, "distributed.process_id: set, but distributed.enabled is False"),
        ({"enabled": True, "num_processes": 2, "process_id": 2}, "must be below num_processes"),
        ({"enabled": True, "coordinator_address": "host"}, "must be 'host:port'"),
        ({"enabled": True, "num_processes": 0}, "num_processes: must be an integer >= 1"),
        ({"enabled": "yes"}, "distributed.enabled: must be True or False"),
        ({"hosts": 2}, "distributed: unknown field 'hosts'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            distributed_settings({"distributed": bad})
