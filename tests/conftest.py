"""Test-wide setup: 8 virtual CPU devices (set before JAX starts), the compile cache of the
scripts the tests run kept in a temporary directory (not the user's), the programs compiled in
this process dropped after each test module, and the slow-test switch."""

import os

import pytest

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(autouse=True, scope="session")
def _compile_cache_of_the_session(tmp_path_factory):
    """Scripts run by the tests keep compiled leaves for this session only."""
    directory = tmp_path_factory.mktemp("compile-cache")
    previous = os.environ.get("JKARCHER_COMPILE_CACHE")
    os.environ["JKARCHER_COMPILE_CACHE"] = str(directory)
    yield
    if previous is None:
        del os.environ["JKARCHER_COMPILE_CACHE"]
    else:
        os.environ["JKARCHER_COMPILE_CACHE"] = previous


@pytest.fixture(autouse=True, scope="module")
def _programs_of_the_module():
    """Each compiled program maps a few regions of memory, and the kernel allows a process 65530
    (vm.max_map_count): the suite compiles more programs than that allows, and XLA then aborts
    while compiling. JAX's caches are cleared after each module, which unmaps them."""
    yield
    import jax  # after the device count above is set

    jax.clear_caches()


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run in CI (CI=true) or with --slow; a plain run skips them."""
    if config.getoption("--slow") or os.environ.get("CI") == "true":
        return
    skip = pytest.mark.skip(reason="slow: runs in CI, or locally with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
