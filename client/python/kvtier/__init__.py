"""kvtier: the Python client of kvtierd, the per-node KV-cache daemon.

    import kvtier, numpy as np
    c = kvtier.Client("unix:./run/kvtierd.sock")
    c.open_session("s1", n_layers=2, n_kv_heads=2, head_dim=128, dtype="f16",
                   codec=dict(scheme="oscar", bits=2, group=32))
    c.append("s1", k, v)            # [layers][tokens][kv_heads][dim]
    k2, v2 = c.fetch("s1", tokens=(0, 100))

The protobuf modules are generated from proto/ at build time or on first use (kvtier._proto
says where they come from); they are never part of the source tree.
"""

from .arrays import attention, bf16_to_f32, f32_to_bf16, from_f32, to_f32
from .client import (DEFAULT_TARGET, SCHEMES, Client, EncodedSession, KvtierError, SessionInfo,
                     Stats)

__version__ = "0.1.0"

__all__ = ["Client", "KvtierError", "SessionInfo", "Stats", "EncodedSession", "DEFAULT_TARGET",
           "SCHEMES", "attention", "bf16_to_f32", "f32_to_bf16", "to_f32", "from_f32",
           "__version__"]
