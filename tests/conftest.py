"""Test-wide settings: offline, deterministic, one thread per xdist worker."""

from __future__ import annotations

import os

# Never reach for a hub: every model the tests use is built from a config or bundled offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a run whose xdist groups would be silently ignored.

    `make test` runs `--dist loadgroup`: each `xdist_group` (the torchrun tests, the tests that
    write the real models' cache) must run on one worker. pytest-xdist 3.8 marks them by setting
    a node's `_nodeid`; pytest 9.2 derives `nodeid` from elsewhere, so the groups' tests spread
    over both workers and their module fixtures (torchrun launches) run twice."""
    from _pytest.nodes import Node  # the property pytest-xdist's grouping relies on

    if config.getoption("dist", "no") == "loadgroup" and "_nodeid" not in Node.nodeid.fget.__code__.co_names:
        raise pytest.UsageError(
            f"pytest {pytest.__version__} ignores pytest-xdist's xdist_group under --dist loadgroup: "
            "install the pytest the dev extra pins (`pip install -e .[dev]`)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _longest_first(items)


def _longest_first(items: list[pytest.Item]) -> None:
    """Longest first: the xdist groups (each one unit, the torchrun group the longest), then modules with `slow`
    tests, then those loading a real model, then the rest (collection order kept within a tier
    and a module). Two xdist workers then finish together instead of one idling while the other
    runs a long unit that was handed out last."""
    def tier(item: pytest.Item) -> int:
        for rank, marker in enumerate(("xdist_group", "slow", "real_model")):
            if item.get_closest_marker(marker):
                return rank
        return 3

    module_tier: dict[str, int] = {}
    for item in items:
        module_tier[item.module.__name__] = min(module_tier.get(item.module.__name__, 3), tier(item))
    items.sort(key=lambda item: module_tier[item.module.__name__])
