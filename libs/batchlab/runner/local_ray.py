"""A Ray cluster on this machine, started once per process (for local runs and tests).

`ensure_local_ray` starts Ray on loopback with no dashboard, no usage reporting and no token
written under the home folder, or returns the cluster this process already joined. Ray
reads LOCAL_RAY_ENV when it is first imported: a process that imports ray before calling
this binds Ray to the machine's external address instead of 127.0.0.1. A cluster
costs about 1 GB and a few seconds to start, so a test session shares one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["GCS_PORT_WAITS_S", "LOCAL_RAY_ENV", "RayStartTimeout", "ensure_local_ray"]

log = logging.getLogger(__name__)

# The longest session-folder root that leaves room for Ray's socket paths under it
# ("session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" adds about 70 characters).
_MAX_TEMP_DIR_CHARS = 36

_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"

class RayStartTimeout(RuntimeError):
    """Ray's node did not start in time, on every attempt: a passing condition (a loaded
    machine), worth retrying later."""


# Ray's wait for its GCS to publish its port, per attempt (RAY_gcs_server_port_wait_time_s,
# 30 s by default, 120 s with RocksDB storage). Here the GCS is up in 1-2 s; a start whose GCS
# never came up (stack starts on 2026-12-01: no GCS log was written; the retry started in
# 2 s) would otherwise wait the whole default. The first attempt gives up sooner, later ones
# wait longer for a machine that is merely busy (with 6 busy loops on the 2 cores here the
# first attempt started in 15.8 s). This bounds only that wait: Ray's 30 s wait for the raylet
# to register is fixed in its code. The variable is set in this process's environment while
# ray.init runs, so the processes Ray starts inherit the successful attempt's value; Ray also
# reads it there as the number of tries (about 1 s apart) to connect to the GCS, 20 by default,
# hence no wait under 20. An operator's own RAY_gcs_server_port_wait_time_s wins.
GCS_PORT_WAITS_S = (20, 60, 120)

LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def ensure_local_ray(temp_dir: str | os.PathLike[str] | None = None, *,
                     num_cpus: int | None = None, attempts: int = 3) -> str:
    """Start a local Ray (or reuse this process's); returns its GCS address host:port.

    Args:
      temp_dir: Ray's session folder (keep it short: it holds unix sockets).
      num_cpus: logical CPUs to advertise (None: the machine's).
      attempts: tries to start it: on a busy or freshly installed machine Ray's node start
        now and then times out ("The current node timed out during startup", "Timed out
        waiting for file .../gcs_server_port"), and a second try succeeds. Ray's wait for
        its GCS is GCS_PORT_WAITS_S[attempt - 1] (the last for later attempts), unless
        RAY_gcs_server_port_wait_time_s is set.

    Raises:
      RayStartTimeout: every attempt timed out.
    """
    # Ray reads some of these when it is imported: set them first.
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    import ray

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {}  # Ray's private options (ray.init(**kwargs))
        # Ray's own rule for its folder: RAY_TMPDIR, else the temp folder.
        ray_root = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
        if temp_dir is None and len(str(Path(ray_root) / "ray")) > _MAX_TEMP_DIR_CHARS:
            # Ray's session folder holds unix sockets, whose paths may not exceed 107 bytes;
            # under a long TMPDIR (a test runner's, say) every ray.init would fail.
            temp_dir = tempfile.mkdtemp(prefix="bl-ray-", dir="/tmp")
            log.info("TMPDIR is too long for Ray's sockets: its session folder is %s", temp_dir)
        if temp_dir is not None:
            Path(temp_dir).mkdir(parents=True, exist_ok=True)
            kwargs["_temp_dir"] = str(Path(temp_dir).absolute())
        operator_wait = os.environ.get(_GCS_WAIT_ENV)
        for attempt in range(1, attempts + 1):
            if operator_wait is None:
                os.environ[_GCS_WAIT_ENV] = str(GCS_PORT_WAITS_S[min(attempt, len(GCS_PORT_WAITS_S)) - 1])
            try:
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **kwargs)
                break
            except Exception as error:  # noqa: BLE001 - Ray raises a bare Exception on timeout
                if "timed out" not in str(error).lower():
                    raise
                if attempt == attempts:
                    ray.shutdown()
                    raise RayStartTimeout(f"the local Ray did not start in {attempts} attempts "
                                          f"({(str(error).strip().splitlines() or ['timed out'])[0]})") from error
                log.warning("Ray did not start (%s); trying again (%d of %d)", error, attempt + 1,
                            attempts)
                ray.shutdown()
            finally:
                if operator_wait is None:
                    os.environ.pop(_GCS_WAIT_ENV, None)
        log.info("started a local Ray (%s CPUs)", num_cpus or "all")
    address: str = ray.get_runtime_context().gcs_address
    return address
