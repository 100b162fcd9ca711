"""The Ray cluster a job runs on: the one it was submitted to, one already running on this machine,
or a new local one.

Ray's workers must import ``stages/`` and ``data/`` (the modules are pickled by reference), so
they need the repository root on their path:

* ``ray job submit --working-dir .`` ships the root and puts it on the workers' path.
* A local Ray this job starts (no cluster running, or ``RAY_ADDRESS=local``) inherits this
  process's environment, so the root goes into ``PYTHONPATH`` here, before ``ray.init``.
* A cluster already running on this machine (``ray start``) did not inherit it: the job's
  runtime environment carries the path.

The second way costs nothing per worker. A runtime environment starts every worker through
Ray's setup process, about half a second of CPU each, which on a small machine delays the stage
actors and the data stream by seconds.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _starts_a_local_cluster(address: str | None) -> bool:
    """Whether ``ray.init(address=address)`` starts a new local Ray (Ray's own lookup: the
    address, else RAY_ADDRESS, else a cluster ``ray start`` left on this machine)."""
    if address == "local":
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:     # another Ray: a runtime environment, which always works
        return False
    return canonicalize_bootstrap_address(address) is None


def init_ray() -> None:
    """Join the cluster this job was submitted to (``ray job submit`` sets RAY_ADDRESS and ships
    the working dir), or one ``ray start`` runs on this machine, or start a local one
    (``RAY_ADDRESS=local`` forces a new one)."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "local"):          # submitted, or told where to go
        ray.init(address=address)
        return
    if _starts_a_local_cluster(address):
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(ROOT) not in path:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *path])
        ray.init(address=address)
    else:
        ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
