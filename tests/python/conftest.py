"""Fixtures of the Python client suite: fresh random inputs (seed printed on failure), and a
real kvtierd on a unix socket in a temporary directory (KVTIERD names the binary)."""

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

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



class Daemon:
    """A kvtierd child process on a unix socket in a private temporary directory."""

    def __init__(self, binary: str, workdir: Path, extra_args=()):
        self.workdir = workdir
        self.socket = workdir / "kvtierd.sock"
        self.log_path = workdir / "kvtierd.log"
        self.args = [binary, f"--socket={self.socket}", *extra_args]
        self._log = open(self.log_path, "wb")
        # The daemon gets SIGTERM when this process dies, even by SIGKILL (a killed pytest
        # left its kvtierd running); setpriv execs it, so proc.pid is kvtierd's.
        die_with_us = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []
        self.proc = subprocess.Popen([*die_with_us, *self.args], stdout=self._log,
                                     stderr=subprocess.STDOUT, cwd=workdir)
        self.target = f"unix:{self.socket}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        import kvtier

        c = kvtier.Client(self.target, timeout=5)
        try:
            try:
                c.wait_ready(timeout_s)
            except kvtier.KvtierError:
                rc = self.proc.poll()
                raise RuntimeError(f"kvtierd ({' '.join(self.args)}) not ready within {timeout_s} s "
                                   f"(exit status {rc}); its log:\n{self.log()}") from None
        finally:
            c.close()

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"kvtierd did not stop within {timeout_s} s of SIGTERM; log:\n{self.log()}")
        self._log.close()
        return self.proc.returncode


def kvtierd_binary() -> str:
    b = os.environ.get("KVTIERD")
    if not b or not Path(b).is_file():
        pytest.fail(f"KVTIERD={b!r} does not name the kvtierd binary (ctest sets it)")
    return b


@pytest.fixture(scope="session")
def daemon():
    with tempfile.TemporaryDirectory(prefix="kvtier-py-") as tmp:
        d = Daemon(kvtierd_binary(), Path(tmp))
        try:
            d.wait_ready()
            yield d
        finally:
            rc = d.stop()
            log = d.log_path.read_text(errors="replace")[-4000:] if d.log_path.exists() else ""
            assert rc == 0, f"kvtierd exited with status {rc} after SIGTERM; log:\n{log}"


@pytest.fixture
def client(daemon):
    import kvtier

    c = kvtier.Client(daemon.target, timeout=60)
    yield c
    c.close()


@pytest.fixture
def sid(request):
    """A fresh session id per test (tests share one daemon)."""
    def make(tag: str = "") -> str:
        return f"{request.node.name[:60]}-{tag}-{uuid.uuid4().hex[:8]}"
    return make
