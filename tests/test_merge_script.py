"""scripts/merge.py end to end: the demo config, command-line overrides, errors as one line and
an exit code, interruptions that leave nothing behind."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers_checkpoints import BF16, make_models, read_all, write_tiny

from jkarcher import compile_cache, demo

ROOT = Path(__file__).resolve().parents[1]


def _merge_script(*args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "merge.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tiny_config_file(tmp_path, models):
    path = tmp_path / "tiny_config.py"
    path.write_text(
        "from jkarcher.config import base_config\n\n\n"
        "def get_config():\n"
        "    config = base_config()\n"
        f"    config.models = {[{'path': str(p), 'weight': 1.0} for p in models]!r}\n"
        f"    config.output = {str(tmp_path / 'out')!r}\n"
        "    return config\n"
    )
    return path


def test_demo_config_merges_the_builtin_example(tmp_path):
    demo = ROOT / "configs" / "demo.py"
    result = _merge_script("--config", demo, f"--config.output={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr
    assert "merged 27 tensors" in result.stdout and "GB/s" in result.stdout
    out = tmp_path / "o"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert len(read_all(out)) == 27


@pytest.mark.slow
def test_fisher_demo_config_estimates_fishers_and_merges_with_them(tmp_path):
    config = ROOT / "configs" / "demo_fisher.py"
    result = _merge_script("--config", config, f"--config.output={tmp_path / 'o'}")
    assert result.returncode == 0, result.stderr
    assert "merged 27 tensors" in result.stdout
    experts = sorted((ROOT / "cache" / "demo").glob("*/expert-*"))
    assert len(experts) >= 3 and all((e / "fisher.safetensors").is_file() for e in experts)
    card = (tmp_path / "o" / "README.md").read_text()
    assert "with each model's diagonal Fisher" in card and "README.md" in card
    assert len(read_all(tmp_path / "o")) == 27


def test_overrides_reach_the_merge(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    config = _tiny_config_file(tmp_path, models)
    result = _merge_script(
        "--config",
        config,
        "--config.method=linear",
        "--config.dtype=float32",
        "--config.out_shard_size=2000",
    )
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert {a.dtype.name for a in read_all(out).values()} == {"float32"}
    card = (out / "README.md").read_text()
    assert json.loads(card.split("```json\n")[1].split("```")[0])["method"] == "linear"


def test_bad_config_exits_with_the_field_named(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    config = _tiny_config_file(tmp_path, models)
    result = _merge_script("--config", config, "--config.method=nope")
    assert result.returncode == 1
    assert "error: method: unknown merge method 'nope'" in result.stderr
    assert not (tmp_path / "out").exists()
    result = _merge_script("--config", config, "--config.colour=blue")
    assert result.returncode != 0 and "colour" in result.stderr


def _one_error_line(result, text):
    """The run failed with exactly one line on stderr, `error: ...` holding `text`."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert text in lines[0], lines[0]


@pytest.mark.parametrize(
    "arguments, text",
    [
        (
            ["--config.outptu=x"],
            "--config.outptu=x: no config field 'outptu' (did you mean 'output'?)",
        ),
        (["--config.distributed.hosts=2"], "--config.distributed.hosts=2: the config has no field"),
        (["--config.seed=abc"], "flag --config.seed=abc: invalid literal"),
        (["extra"], "unexpected arguments: extra"),
        (["--config.params.max_iterr=5"], "params: method 'karcher' has no parameter 'max_iterr'"),
        (["--config.method=linear", "--config.params.density=0.5"], "has no parameter 'density'"),
    ],
)
def test_command_line_mistakes_are_one_line(tmp_path, arguments, text):
    config = _tiny_config_file(tmp_path, make_models(tmp_path / "in", n=2))
    _one_error_line(_merge_script("--config", config, *arguments), text)
    assert not (tmp_path / "out").exists()


def test_a_missing_or_broken_config_file_is_one_line(tmp_path):
    _one_error_line(_merge_script("--config", tmp_path / "none.py"), "none.py: no such file")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    _one_error_line(_merge_script("--config", broken), "SyntaxError: invalid syntax")


def test_method_parameters_the_config_file_does_not_declare(tmp_path):
    config = _tiny_config_file(tmp_path, make_models(tmp_path / "in", n=2))
    result = _merge_script(
        "--config", config, "--config.params.max_iter=3", "--config.params.tol=1e-5"
    )
    assert result.returncode == 0, result.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    params = json.loads(card.split("```json\n")[1].split("```")[0])["params"]
    assert params["max_iter"] == 3 and params["tol"] == 1e-5


def test_help_lists_the_config_fields_and_the_methods():
    result = _merge_script("--help")
    assert result.returncode == 0
    assert "Config fields" in result.stdout and "  allow_crimes = False" in result.stdout
    assert "  karcher: weighted Karcher mean" in result.stdout and "  ties: " in result.stdout


def test_the_demo_overwrites_only_its_own_output(tmp_path):
    demo_config = ROOT / "configs" / "demo.py"
    earlier = tmp_path / "earlier"
    assert _merge_script("--config", demo_config, f"--config.output={earlier}").returncode == 0
    card = (earlier / "README.md").read_text()
    _one_error_line(
        _merge_script("--config", demo_config, f"--config.output={earlier}"), "already exists"
    )
    assert (earlier / "README.md").read_text() == card
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    result = _merge_script(
        "--config", demo_config, f"--config.output={mine}", "--config.overwrite=True"
    )
    _one_error_line(result, "is not a jkarcher output (it holds keep.txt)")
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def _slow_models(root: Path) -> list[Path]:
    """Two models large enough that a merge runs for a few seconds."""
    config = demo.qwen2_config(4096, hidden_size=256, intermediate_size=768, num_layers=6)
    rng = np.random.default_rng(0)
    return [
        write_tiny(root / f"m{i}", demo.random_weights(config, rng, BF16), config) for i in range(2)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_merge_prints_one_line_and_leaves_nothing(tmp_path, signum):
    config = _tiny_config_file(tmp_path, _slow_models(tmp_path / "in"))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "merge.py"), "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.incomplete-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert stderr.count(f"interrupted by {signal.Signals(signum).name}") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


PROGRAM_SIGNALLED_IN_A_GC_CALLBACK = """
import gc, os, signal, time
from jkarcher.commands.running import stop_quietly_on_signals

def program():
    fired = []

    def callback(phase, info):
        if not fired:
            fired.append(phase)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs inside this callback
            sum(range(10000))

    gc.callbacks.append(callback)
    gc.collect()
    time.sleep(10)
    print("finished")

stop_quietly_on_signals(program)
"""


def _run_program(source: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=50
    )


def test_a_signal_inside_a_garbage_collector_callback_still_stops_the_program():
    """An exception raised in a gc callback is ignored by Python: the signal must still stop."""
    result = _run_program(PROGRAM_SIGNALLED_IN_A_GC_CALLBACK)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "finished" not in result.stdout
    assert result.stderr.count("interrupted by SIGTERM") == 1, result.stderr


PROGRAM_LEFT_WITH_A_THREAD = """
import os, signal, threading, time
from jkarcher.commands.running import stop_quietly_on_signals

def program():
    # A thread nobody stops, as a pool's worker started just as a signal comes is left.
    threading.Thread(target=threading.Event().wait, name="forgotten").start()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

stop_quietly_on_signals(program)
"""


def test_an_interrupted_program_exits_though_a_thread_is_left_running():
    result = _run_program(PROGRAM_LEFT_WITH_A_THREAD)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert result.stderr == "interrupted by SIGTERM: stopping; no output is written\n"


def test_bad_input_exits_before_writing(tmp_path):
    models = make_models(tmp_path / "in", n=2)
    (models[1] / "model.safetensors").rename(models[1] / "pytorch_model.bin")
    result = _merge_script("--config", _tiny_config_file(tmp_path, models))
    assert result.returncode == 1
    assert "error: models[1]:" in result.stderr and "pickled" in result.stderr
    assert not (tmp_path / "out").exists()


def _leaves_line(result) -> str:
    return next(line for line in result.stdout.splitlines() if "leaves (" in line)


def test_compiled_leaves_are_kept_for_the_next_run(tmp_path, monkeypatch):
    """The second merge of the same shapes compiles nothing new: every leaf is loaded from the
    cache, and the output is bit for bit that of a merge that compiles every leaf. A damaged
    entry is compiled again, never run."""
    models = make_models(tmp_path / "in", n=3, dtype=BF16)
    config = _tiny_config_file(tmp_path, models)
    cache = tmp_path / "compile-cache"
    monkeypatch.setenv("JKARCHER_COMPILE_CACHE", str(cache))
    method = "--config.method=karcher"
    first = _merge_script("--config", config, method)
    assert first.returncode == 0, first.stderr
    assert "(0 from the compile cache)" in _leaves_line(first)
    kept = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert kept and not any(name.startswith(".partial") for name in kept)
    compiled_every_leaf = read_all(tmp_path / "out")

    second = _merge_script("--config", config, method, "--config.overwrite=True")
    assert second.returncode == 0, second.stderr
    leaves = _leaves_line(second)
    assert f"{len(kept)} leaves ({len(kept)} from the compile cache)" in leaves
    assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == kept
    loaded = read_all(tmp_path / "out")
    assert loaded.keys() == compiled_every_leaf.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == compiled_every_leaf[name].dtype
        assert tensor.tobytes() == compiled_every_leaf[name].tobytes(), name

    damaged = next(p for p in cache.rglob("*") if p.is_file())
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = _merge_script("--config", config, method, "--config.overwrite=True")
    assert third.returncode == 0, third.stderr
    assert f"({len(kept) - 1} from the compile cache)" in _leaves_line(third)
    assert all(read_all(tmp_path / "out")[n].tobytes() == t.tobytes() for n, t in loaded.items())


def test_a_leaf_key_names_what_the_leaf_is_compiled_from(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "_leaf_directory", None)
    assert compile_cache.key("karcher", ("signature",)) is None
    monkeypatch.setattr(compile_cache, "_leaf_directory", tmp_path)
    key = compile_cache.key("karcher", ("signature",))
    assert key == compile_cache.key("karcher", ("signature",))
    assert key != compile_cache.key("linear", ("signature",))
    assert key != compile_cache.key("karcher", ("other signature",))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert key != compile_cache.key("karcher", ("signature",))
    assert compile_cache.load(key) is None


@pytest.mark.parametrize("device", [0, 5])
def test_a_stored_leaf_loads_onto_the_devices_it_was_compiled_for(tmp_path, monkeypatch, device):
    """A leaf of a one-device mesh, on a host of eight devices, runs on that device when loaded
    (loaded onto every device, it would expect eight shards of each argument)."""
    monkeypatch.setattr(compile_cache, "_leaf_directory", tmp_path)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[device : device + 1]), ("rows",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("rows"))
    shaped = jax.ShapeDtypeStruct((8,), np.float32, sharding=sharding)
    compiled = jax.jit(lambda x: 2 * x).lower(shaped).compile()
    key = compile_cache.key("linear", ("one device", device))
    compile_cache.store(key, compiled)
    loaded = compile_cache.load(key)
    x = jax.device_put(np.arange(8, dtype=np.float32), sharding)
    assert loaded is not None
    np.testing.assert_array_equal(loaded(x), 2 * np.arange(8))


def test_the_compile_cache_directory_comes_from_the_environment(tmp_path):
    assert compile_cache.cache_directory({"JKARCHER_COMPILE_CACHE": "off"}) is None
    chosen = {"JKARCHER_COMPILE_CACHE": str(tmp_path), "JAX_COMPILATION_CACHE_DIR": "/elsewhere"}
    assert compile_cache.cache_directory(chosen) == tmp_path
    assert compile_cache.cache_directory({"JAX_COMPILATION_CACHE_DIR": "/x"}) == Path("/x")
    default = compile_cache.cache_directory({"XDG_CACHE_HOME": str(tmp_path)})
    assert default == tmp_path / "jkarcher" / "jax"
