"""Local Ray settings in one place, used by the CLI, the sweeps, Ray Train and every test.

On this project's machines Ray must bind to 127.0.0.1 (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`;
otherwise it binds a non-loopback address), send no usage stats, start no dashboard and keep a
small object store: the sweeps move only configs and metrics through it.
"""

from __future__ import annotations

import os

LOCAL_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
OBJECT_STORE_BYTES = 100 * 1024 * 1024


def ray_env() -> dict[str, str]:
    """The environment a process that starts Ray needs (a copy of this one with `LOCAL_ENV` set)."""
    return {**os.environ, **LOCAL_ENV}


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_bytes: int = OBJECT_STORE_BYTES):
    """Start an embedded local Ray (default) or connect to the cluster at `address`; returns ray's context.

    Embedded: `num_cpus` (default: this machine's cores), no dashboard, a small object store, every
    service on 127.0.0.1. A Ray that is already initialized in this process is reused as it is.
    """
    os.environ.update(LOCAL_ENV)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context()
    if address:
        return ray.init(address=address, log_to_driver=False)
    return ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                    object_store_memory=object_store_bytes, log_to_driver=False, configure_logging=False)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
