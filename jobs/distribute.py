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

from bulk_explain.workers.faults import fault_point

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def connect(address: Optional[str]) -> bool:
    """Starts an embedded local Ray (address None) or joins a cluster. Returns True if this call
    started/connected Ray (and so should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address is None:
        # Workers of the embedded cluster must import bulk_explain (jobs/, workers/, schemas/) even from an
        # uninstalled checkout (python -m bulk_explain ...).
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
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as exc:
            from bulk_explain.jobs.validation import ConfigError

            hint = ""
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                # Ray sends its token to an explicit address only when told to (docs/cluster.md).
                hint = ("; if the cluster has token authentication on, export RAY_AUTH_MODE=token and "
                        "provide its token (RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN or ~/.ray/auth_token)")
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"could not join the Ray cluster at {address}: {first}{hint}") from None
    # Ray is up but the caller has not taken its signals back yet (see bulk_explain.jobs.runtime.ray_startup).
    fault_point("ray_started")
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
        # A GPU actor takes its node's share of the cores: decode and encode feed the GPU, and
        # its read/write pools are sized from these CPUs (bench/GPU.md: host work is the limit).
        return {"count": n, "num_gpus": 1 if n <= gpus else gpus / n, "num_cpus": cpus_each,
                "tf_threads": None}
    nodes = max(1, int(resources["nodes"]))
    n = requested or nodes
    per_node = max(1, (n + nodes - 1) // nodes)
    cpus_each = max(1, int(resources["min_node_cpus"] // per_node)) if resources["min_node_cpus"] else 1
    return {"count": n, "num_gpus": 0, "num_cpus": cpus_each, "tf_threads": cpus_each}


class WorkerStartError(RuntimeError):
    """No worker could load the model (the message is one line)."""


class _Slot:
    """One place in the pool: the current actor, its generation, and whether it has loaded."""

    __slots__ = ("actor", "gen", "ready", "load", "failures", "alone")

    def __init__(self, actor, gen: int):
        self.actor, self.gen = actor, gen
        self.ready = False
        self.load = 0
        self.failures = 0
        self.alone = None  # key of the suspect unit this actor runs by itself, if any


class ActorPool:
    """Runs `method(unit)` for each unit over `count` actors of `cls(*args)`.

    Each actor keeps up to `in_flight` units queued so it never waits for the driver. A unit whose
    task fails (actor died, or raised) is retried up to `max_retries` times, then reported failed.
    An actor that dies holding several units does not say which one killed it: none of them is
    charged, each is re-run alone on an actor of its own ("suspect"), and only a death while a unit
    runs alone counts against it, so innocent units never fail because of their neighbour.
    A dead actor is replaced by a fresh one, which gets work only once it has loaded (on a cluster
    that lost a node the replacement may wait for resources while the surviving actors finish the
    job). A slot whose replacements keep failing to start is retired; when no actor is left, or
    none could start for `start_timeout_s` while work waits, the remaining units are reported failed.
    """

    MAX_START_FAILURES = 3

    def __init__(self, cls, args: Sequence, count: int, options: Dict[str, Any], in_flight: int = 2,
                 start_timeout_s: float = 900.0):
        import ray

        options = dict(options)
        # Concurrency groups are declared on the class, not accepted by .options().
        groups = options.pop("concurrency_groups", None)
        self._remote_cls = ray.remote(concurrency_groups=groups)(cls) if groups else ray.remote(cls)
        self._args = tuple(args)
        self._options = dict(options, max_concurrency=in_flight, max_restarts=0)
        self._in_flight = in_flight
        self._gen = 0
        self.start_timeout_s = start_timeout_s
        self._slots: List[_Slot] = [self._new_slot() for _ in range(count)]
        self._starting: Dict[Any, tuple] = {}  # ping ref -> (slot index, generation)
        self.replaced = 0

    @property
    def actors(self) -> list:
        """The live actor handles (replacements included)."""
        return [s.actor for s in self._slots if s.actor is not None]

    def _new_slot(self) -> _Slot:
        self._gen += 1
        return _Slot(self._remote_cls.options(**self._options).remote(*self._args), self._gen)

    def wait_ready(self) -> None:
        """Blocks until every actor has loaded its model (on an autoscaling cluster this includes
        waiting for nodes).

        Raises:
            WorkerStartError: an actor failed in its constructor.
        """
        import ray

        try:
            ray.get([s.actor.ping.remote() for s in self._slots])
        except Exception as exc:
            raise WorkerStartError(f"workers could not start: {_one_line(exc)}") from None
        for s in self._slots:
            s.ready = True

    def run(self, method: str, units: Sequence, on_done: Callable[[Any, Any], None],
            on_failed: Callable[[Any, str], None], max_retries: int = 2, extra_args: Sequence = ()) -> None:
        import ray
        from ray.exceptions import RayActorError, RayError

        queue: List[tuple] = list(enumerate(units))[::-1]  # pop() from the end = plan order
        suspects: List[tuple] = []  # units whose actor died under them and others: run alone
        attempts: Dict[int, int] = {}
        pending: Dict[Any, tuple] = {}  # ref -> (key, unit, slot index, generation)
        died_holding: Dict[tuple, set] = {}  # (slot index, generation) of a dead actor -> its keys
        waiting_since: Optional[float] = None

        def submit(si, slot, key, unit):
            ref = getattr(slot.actor, method).remote(unit, *extra_args)
            pending[ref] = (key, unit, si, slot.gen)
            slot.load += 1

        def fill():
            for si, slot in enumerate(self._slots):
                if not (slot.ready and slot.actor is not None) or slot.alone is not None:
                    continue
                if suspects:
                    # A suspect waits for an idle actor; busy actors drain (no new work) meanwhile.
                    if slot.load == 0:
                        key, unit = suspects.pop()
                        slot.alone = key
                        submit(si, slot, key, unit)
                    continue
                while queue and slot.load < self._in_flight:
                    key, unit = queue.pop()
                    submit(si, slot, key, unit)

        fill()
        while pending or ((queue or suspects) and self._starting):
            done, _ = ray.wait(list(pending) + list(self._starting), num_returns=1, timeout=1.0)
            if not done:
                if not pending:  # work is waiting and no actor can take it yet
                    waiting_since = waiting_since or time.monotonic()
                    if time.monotonic() - waiting_since > self.start_timeout_s:
                        break
                continue
            waiting_since = None
            for ref in done:
                if ref in self._starting:
                    self._started(ref)
                    continue
                key, unit, si, gen = pending.pop(ref)
                slot = self._slots[si]
                current = slot.gen == gen
                if current:
                    slot.load -= 1
                    if slot.alone == key:
                        slot.alone = None
                try:
                    value = ray.get(ref)
                except RayError as exc:
                    reason = _one_line(exc)
                    if isinstance(exc, RayActorError):
                        if (si, gen) not in died_holding:  # the first of the dead actor's units
                            died_holding[(si, gen)] = {k for k, _, s, g in pending.values()
                                                       if (s, g) == (si, gen)} | {key}
                        if current:
                            self._replace(si)
                        if len(died_holding[(si, gen)]) > 1:
                            print(f"[bulk-explain] retrying {unit!r} alone, not counted as an attempt: its "
                                  f"worker died holding {len(died_holding[(si, gen)])} units ({reason})",
                                  file=sys.stderr, flush=True)
                            suspects.insert(0, (key, unit))
                            continue
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] <= max_retries:
                        print(f"[bulk-explain] retrying {unit!r} after: {reason}", file=sys.stderr, flush=True)
                        if isinstance(exc, RayActorError):
                            suspects.insert(0, (key, unit))  # it killed a worker: keep it alone
                        else:
                            queue.append((key, unit))
                    else:
                        on_failed(unit, reason)
                    continue
                on_done(unit, value)
            fill()
        left = suspects[::-1] + queue[::-1]
        if left:
            why = ("no worker is left: every replacement failed to start" if not self._starting else
                   f"no worker could start within {self.start_timeout_s:.0f}s")
            for _, unit in left:
                on_failed(unit, why)
            queue.clear()
            suspects.clear()

    def _started(self, ref) -> None:
        import ray

        si, gen = self._starting.pop(ref)
        slot = self._slots[si]
        if slot.gen != gen:
            return
        try:
            ray.get(ref)
        except Exception as exc:
            slot.failures += 1
            print(f"[bulk-explain] replacement worker failed to start ({slot.failures}/{self.MAX_START_FAILURES}): "
                  f"{_one_line(exc)}", file=sys.stderr, flush=True)
            if slot.failures < self.MAX_START_FAILURES:
                self._replace(si, failures=slot.failures)
            else:
                self._kill(slot.actor)
                slot.actor = None
            return
        slot.ready = True
        slot.failures = 0

    def _replace(self, si: int, failures: int = 0) -> None:
        self._kill(self._slots[si].actor)
        slot = self._new_slot()
        slot.failures = failures
        self._slots[si] = slot
        self._starting[slot.actor.ping.remote()] = (si, slot.gen)
        self.replaced += 1

    @staticmethod
    def _kill(actor) -> None:
        import ray

        if actor is None:
            return
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def shutdown(self, wait_s: float = 30.0) -> None:
        """Kills every actor and waits (at most `wait_s`) until each is gone: `ray.kill` is
        asynchronous, and a caller's Ray (the actors outlive a returned job otherwise for a moment)
        must get its CPUs and GPUs back when the job returns, also after Ctrl-C."""
        import ray

        actors = [slot.actor for slot in self._slots if slot.actor is not None]
        for actor in actors:
            self._kill(actor)
        self._starting.clear()
        deadline = time.monotonic() + wait_s
        while actors and time.monotonic() < deadline:
            alive = []
            for actor in actors:
                try:
                    ray.get(actor.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
                    alive.append(actor)  # answered: the kill has not landed yet
                except Exception:  # noqa: BLE001 - gone (RayActorError), busy past the deadline, Ray going away
                    pass
            actors = alive
            if actors:
                time.sleep(0.05)


def _one_line(exc: BaseException) -> str:
    lines = [l.strip() for l in str(exc).strip().splitlines() if l.strip()]
    # Ray's RayTaskError text ends with the original "ExcType: message" line.
    return lines[-1][:500] if lines else type(exc).__name__
