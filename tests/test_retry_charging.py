"""Retry charging (issue 8 item 7): when an actor dies holding two units, only the unit that killed
it is charged an attempt. Before, both were, so with max_retries=0 the innocent unit failed too.

The pool runs a tiny actor (no model) in the session's embedded Ray; the killer unit goes through
the project's fault point (`before_stage:1`, action exit = os._exit in the worker process).
"""

import pytest

from conftest import REPO
from bulk_explain.jobs.distribute import ActorPool


def _make_worker_class():
    # Defined in a function so that Ray pickles it by value (tests/ is not importable by workers).
    class Worker:
        def __init__(self):
            import threading

            self.innocent_running = threading.Event()
            self.killer_running = threading.Event()
            self.never = threading.Event()

        def ping(self):
            return "ok"

        def work(self, unit):
            import os

            from bulk_explain.workers.faults import fault_point

            if unit != 1:
                self.innocent_running.set()
                if self.killer_running.wait(timeout=8):  # alone (re-run), it returns after 8 s
                    self.never.wait(timeout=60)  # next to the killer: in flight until the process dies
                return f"done {unit} in {os.getpid()}"
            self.killer_running.set()
            self.innocent_running.wait(timeout=8)  # kill only once the innocent unit is in flight
            fault_point("before_stage", unit)
            return "unit 1 survived"

    return Worker


@pytest.mark.parametrize("max_retries", [0, 1])
def test_only_the_unit_that_killed_its_actor_is_charged(ray_local, max_retries):
    env = {"PYTHONPATH": REPO, "BULK_EXPLAIN_TEST_CRASH_AT": "before_stage:1", "BULK_EXPLAIN_TEST_CRASH_ACTION": "exit"}
    pool = ActorPool(_make_worker_class(), (), 1, {"num_cpus": 1, "runtime_env": {"env_vars": env}}, in_flight=2)
    done, failed = {}, {}
    try:
        pool.wait_ready()
        pool.run("work", [0, 1], lambda u, v: done.update({u: v}), lambda u, r: failed.update({u: r}),
                 max_retries=max_retries)
    finally:
        pool.shutdown()
    assert sorted(done) == [0] and sorted(failed) == [1], (done, failed)
    # the first death (two units held) charged nobody; each death of unit 1 alone charged it once
    assert pool.replaced == 2 + max_retries
