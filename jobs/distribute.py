"""The distribute stage: connect to Ray (embedded or a cluster) and run work units on a pool of
model-holding actors, with bounded retries and replacement of dead actors.

Why an actor pool and not Ray Data's `map_batches`: the unit of work and of commit is a shard
that the worker writes itself (outputs, manifest part, marker), so the driver needs per-shard
results, retries and progress, not a stream of rows; see ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def connect(address: Optional[str]) -> bool:
    """Starts an embedded local Ray (address None) or joins a cluster. Returns True if this call
    started/connected Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        # Workers of the embedded cluster must import jobs/ and workers/ even from an
        # uninstalled checkout (python -m jobs ...).
        pythonpath = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            logging_level=logging.WARNING,
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
            configure_logging=True,
        )
    else:
        # Under `ray job submit` the job's runtime_env (working_dir) is inherited: pass none here.
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def cluster_resources() -> Dict[str, Any]:
    """CPUs and GPUs of the alive nodes that can run work (CPU > 0 or GPU > 0)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    work_nodes = [n for n in nodes if n["Resources"].get("CPU", 0) > 0 or n["Resources"].get("GPU", 0) > 0]
    return {
        "nodes": len(work_nodes),
        "cpus": sum(n["Resources"].get("CPU", 0) for n in work_nodes),
        "gpus": sum(n["Resources"].get("GPU", 0) for n in work_nodes),
        "min_node_cpus": min((n["Resources"].get("CPU", 0) for n in work_nodes), default=0),
    }


def plan_workers(requested: Optional[int], resources: Dict[str, Any],
                 gpus_per_worker: Optional[float] = None) -> Dict[str, Any]:
    """How many actors, and what each reserves.

    GPU cluster: one actor per GPU (num_gpus=1). CPU only: by default one actor per node using all
    its cores; with `requested` actors, the cores are split between them and TF's pools are
    sized to each share (TF ignores OMP_NUM_THREADS).
    """
    gpus = int(resources["gpus"])
    if gpus_per_worker:
        # Asked for explicitly: on an autoscaling cluster the GPU nodes may not exist yet.
        n = requested or max(1, int(gpus / gpus_per_worker))
        return {"count": n, "num_gpus": gpus_per_worker, "num_cpus": 1, "tf_threads": None}
    if gpus > 0:
        n = requested or gpus
        cpus_each = max(1, int(resources["cpus"] // max(n, 1)))
        return {"count": n, "num_gpus": 1 if n <= gpus else gpus / n, "num_cpus": min(cpus_each, 4),
                "tf_threads": None}
    nodes = max(1, int(resources["nodes"]))
    n = requested or nodes
    per_node = max(1, (n + nodes - 1) // nodes)
    cpus_each = max(1, int(resources["min_node_cpus"] // per_node)) if resources["min_node_cpus"] else 1
    return {"count": n, "num_gpus": 0, "num_cpus": cpus_each, "tf_threads": cpus_each}


class WorkerStartError(RuntimeError):
    """No worker could load the model (the message is one line)."""


class ActorPool:
    """Runs `method(unit)` for each unit over `count` actors of `cls(*args)`.

    Each actor keeps up to `in_flight` units queued so it never waits for the driver. A unit whose
    task fails (actor died, or raised) is retried up to `max_retries` times; a dead actor is
    replaced by a fresh one.
    """

    def __init__(self, cls, args: Sequence, count: int, options: Dict[str, Any], in_flight: int = 2):
        import ray

        self._remote_cls = ray.remote(cls)
        self._args = tuple(args)
        self._options = dict(options, max_concurrency=in_flight, max_restarts=0)
        self._in_flight = in_flight
        self.actors = [self._new_actor() for _ in range(count)]
        self.replaced = 0

    def _new_actor(self):
        return self._remote_cls.options(**self._options).remote(*self._args)

    def wait_ready(self) -> None:
        """Blocks until every actor has loaded its model (on an autoscaling cluster this includes
        waiting for nodes).

        Raises:
            WorkerStartError: an actor failed in its constructor.
        """
        import ray

        try:
            ray.get([a.ping.remote() for a in self.actors])
        except Exception as exc:
            raise WorkerStartError(f"workers could not start: {_one_line(exc)}") from None

    def run(self, method: str, units: Sequence, on_done: Callable[[Any, Any], None],
            on_failed: Callable[[Any, str], None], max_retries: int = 2, extra_args: Sequence = ()) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        queue: List[Any] = list(units)[::-1]  # pop() from the end = plan order
        attempts: Dict[int, int] = {}
        pending: Dict[Any, tuple] = {}  # ref -> (unit, actor index)
        load = [0] * len(self.actors)

        def submit(ai):
            unit = queue.pop()
            ref = getattr(self.actors[ai], method).remote(unit, *extra_args)
            pending[ref] = (unit, ai)
            load[ai] += 1

        def fill():
            for ai in range(len(self.actors)):
                while queue and load[ai] < self._in_flight:
                    submit(ai)

        fill()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in done:
                unit, ai = pending.pop(ref)
                load[ai] -= 1
                try:
                    on_done(unit, ray.get(ref))
                except (RayActorError, RayTaskError) as exc:
                    key = id(unit)
                    attempts[key] = attempts.get(key, 0) + 1
                    if isinstance(exc, RayActorError):
                        self._replace(ai)
                    reason = _one_line(exc)
                    if attempts[key] <= max_retries:
                        print(f"[bulk-explain] retrying {unit!r} after: {reason}", file=sys.stderr)
                        queue.append(unit)
                    else:
                        on_failed(unit, reason)
            fill()

    def _replace(self, ai: int) -> None:
        import ray

        try:
            ray.kill(self.actors[ai], no_restart=True)
        except Exception:
            pass
        self.actors[ai] = self._new_actor()
        self.replaced += 1

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass


def _one_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    # Ray's RayTaskError text ends with the original "ExcType: message" line.
    return lines[-1][:500] if lines else type(exc).__name__
