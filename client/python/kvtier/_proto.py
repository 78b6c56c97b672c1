"""Loads the protobuf modules generated from proto/ (never committed to the repository).

Where they come from, in order:

1. ``KVTIER_PYGEN_DIR``: a directory holding ``kvtier/v1/kvtier_pb2.py`` and
   ``grpc/health/v1/health_pb2.py``. The build makes one at ``${CMAKE_BINARY_DIR}/python``
   (custom target ``kvtier_python_proto`` in tests/python/CMakeLists.txt, run by ``cmake
   --build``), and ctest points this variable at it.
2. Otherwise they are generated lazily, on first import, with grpcio-tools (in-process
   ``grpc_tools.protoc``) from the .proto files into a cache directory
   (``KVTIER_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvtier``, else ``~/.cache/kvtier``), in a
   subdirectory named by a hash of the .proto contents and the grpcio-tools version, so a
   changed contract never loads stale code. The .proto files are found at
   ``KVTIER_PROTO_DIR`` or, in a source checkout, at ``<repo>/proto``.

Only the message modules (``*_pb2``) are used. The gRPC method handles are built from the
service descriptors in those modules (kvtier.client), so the full method names and streaming
kinds always come from the contract itself and the ``*_pb2_grpc`` stubs, whose imports would
collide with this package's name (``kvtier``) and grpcio's (``grpc``), are not needed.

The modules are loaded under private names (``kvtier._pb.kvtier_pb2``, ...) because the
natural names collide with this package and with grpcio.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

PROTO_FILES = ("kvtier/v1/kvtier.proto", "grpc/health/v1/health.proto")
_MODULE_NAMES = {
    "kvtier/v1/kvtier.proto": "kvtier._pb.kvtier_pb2",
    "grpc/health/v1/health.proto": "kvtier._pb.health_pb2",
}

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}


class ProtoUnavailable(ImportError):
    """The generated modules are neither in the build tree nor generatable here."""


def _pb2_path(root: Path, proto: str) -> Path:
    return root / (proto[: -len(".proto")] + "_pb2.py")


def _proto_source_dir() -> Path:
    env = os.environ.get("KVTIER_PROTO_DIR")
    if env:
        return Path(env)
    # client/python/kvtier/_proto.py -> repository root
    return Path(__file__).resolve().parents[3] / "proto"


def _cache_root() -> Path:
    env = os.environ.get("KVTIER_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "kvtier"


def generate(proto_dir: Path, out_dir: Path) -> None:
    """Runs grpcio-tools' protoc on the contract, writing *_pb2.py under out_dir."""
    try:
        from grpc_tools import protoc  # type: ignore
    except ImportError as e:
        raise ProtoUnavailable(
            "kvtier: generated protobuf modules not found (KVTIER_PYGEN_DIR unset) and "
            "grpcio-tools is not installed to generate them: pip install grpcio-tools, or "
            "build with cmake and set KVTIER_PYGEN_DIR=<build>/python") from e
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"--proto_path={proto_dir}", f"--proto_path={well_known}",
            f"--python_out={out_dir}"] + [str(proto_dir / p) for p in PROTO_FILES]
    rc = protoc.main(args)
    if rc != 0:
        raise ProtoUnavailable(f"kvtier: grpc_tools.protoc failed with status {rc} on {proto_dir}")


def _lazy_dir() -> Path:
    proto_dir = _proto_source_dir()
    h = hashlib.sha256()
    for p in PROTO_FILES:
        f = proto_dir / p
        if not f.is_file():
            raise ProtoUnavailable(
                f"kvtier: {f} not found: set KVTIER_PYGEN_DIR to the build's python/ "
                "directory or KVTIER_PROTO_DIR to the repository's proto/ directory")
        h.update(p.encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        from grpc_tools import __version__ as tools_version  # type: ignore
    except ImportError:
        tools_version = "unknown"
    h.update(str(tools_version).encode())
    target = _cache_root() / f"pygen-{h.hexdigest()[:16]}"
    if all(_pb2_path(target, p).is_file() for p in PROTO_FILES):
        return target
    # Generate beside the target and rename: concurrent importers (pytest workers, several
    # processes) either see a complete directory or none.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pygen-", dir=target.parent))
    generate(proto_dir, tmp)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process won the race; its directory is equally good.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not all(_pb2_path(target, p).is_file() for p in PROTO_FILES):
            raise
    return target


def generated_dir() -> Path:
    env = os.environ.get("KVTIER_PYGEN_DIR")
    if env:
        root = Path(env)
        missing = [str(_pb2_path(root, p)) for p in PROTO_FILES if not _pb2_path(root, p).is_file()]
        if missing:
            raise ProtoUnavailable(
                f"kvtier: KVTIER_PYGEN_DIR={env} lacks {', '.join(missing)} "
                "(build the kvtier_python_proto target)")
        return root
    return _lazy_dir()


def _load(proto: str) -> ModuleType:
    name = _MODULE_NAMES[proto]
    with _lock:
        mod = _loaded.get(name)
        if mod is not None:
            return mod
        path = _pb2_path(generated_dir(), proto)
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
        _loaded[name] = mod
        return mod


def kvtier_pb2() -> ModuleType:
    return _load("kvtier/v1/kvtier.proto")


def health_pb2() -> ModuleType:
    return _load("grpc/health/v1/health.proto")
