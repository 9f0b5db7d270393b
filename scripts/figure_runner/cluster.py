"""Starting or joining Ray, and its workers: one per GPU of the cluster, or ``cpu_servers`` CPU servers
when it has none.

The workers' code (this package, comfy_client.py, comfy_server.py) travels with the job through Ray's
runtime environment; ComfyUI with this pack and the Python that runs it must be on every node at the
paths given (``--comfy``, ``--comfy-python``: by default this checkout's .comfy/, so a cluster of
machines that each ran scripts/setup_env.sh in the same place needs neither).
"""

from __future__ import annotations

import os
from pathlib import Path

import comfy_client
import comfy_server
import ray

from .params import RunnerError
from .worker import ComfyWorker

# A local cluster's object store: small enough never to need a large /dev/shm (Ray falls back to /tmp
# with a warning where /dev/shm is smaller, and refuses only stores over 10 GB), large enough for a few
# concepts in flight; Ray spills older objects to disk beyond it.
LOCAL_OBJECT_STORE_BYTES = 1 << 30
# A worker whose process dies is started again by Ray (a new server) this many times.
WORKER_RESTARTS = 3


def connect(address: str | None, cpu_servers: int, temp_dir: Path | None) -> None:
    """Join the cluster at ``address``, or start a local one (it ends with this process)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a cluster started here reports nothing anywhere
    package = Path(__file__).resolve().parent
    runtime_env = {"py_modules": [str(package), comfy_client.__file__, comfy_server.__file__]}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return
    ray.init(num_cpus=max(os.cpu_count() or 1, cpu_servers), include_dashboard=False, log_to_driver=False,
             object_store_memory=LOCAL_OBJECT_STORE_BYTES, runtime_env=runtime_env,
             _temp_dir=str(temp_dir) if temp_dir else None)


def start_workers(cpu_servers: int, settings: dict) -> tuple[list, list[dict]]:
    """The workers, each with its server started, and their descriptions; the servers that failed to
    start are reported and left out."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    count = gpus or cpu_servers
    actor = ray.remote(ComfyWorker).options(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=WORKER_RESTARTS,
                                            max_task_retries=0)
    handles = [actor.remote(f"worker-{i}", {**settings, "gpu": bool(gpus)}) for i in range(count)]
    workers, infos, errors = [], [], []
    for handle, described in zip(handles, [h.describe.remote() for h in handles]):
        try:
            infos.append(ray.get(described))
            workers.append(handle)
        except ray.exceptions.RayError as err:
            errors.append(str(err))
            print(f"[run_figure] a worker did not start: {str(err)[-3000:]}", flush=True)
    if not workers:
        raise RunnerError(f"no ComfyUI server started; the first error:\n{errors[0][-3000:]}\nCheck --comfy and "
                          "--comfy-python (paths on the workers' nodes) and the server.log under --worker-dir")
    return workers, infos


def stop_workers(workers: list) -> None:
    """Each server stopped by its worker (its folders cleaned), then the workers ended."""
    try:
        ray.get([w.close.remote() for w in workers], timeout=60)
    except ray.exceptions.RayError:
        pass  # a lost worker's server died with it
    for w in workers:
        ray.kill(w)
