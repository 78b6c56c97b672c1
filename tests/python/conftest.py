"""Fixtures of the Python client suite: fresh random inputs (seed printed on failure), and a
real kvtierd on a unix socket in a temporary directory (KVTIERD names the binary)."""

import os
import secrets

import numpy as np
import pytest


def _seed() -> int:
    s = os.environ.get("KVT_SEED")
    return int(s, 0) if s else secrets.randbits(32)


@pytest.fixture
def rng(request):
    seed = _seed()
    request.node.kvt_seed = seed
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    seed = getattr(item, "kvt_seed", None)
    if rep.failed and seed is not None:
        rep.sections.append(("kvtier seed", f"KVT_SEED={seed} reproduces this run"))
    return rep
