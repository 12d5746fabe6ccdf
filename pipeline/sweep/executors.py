"""Who runs the trials: one after another in this process, or as Ray tasks (a local instance or a
cluster), each with its own CPU / GPU share. Both call the same function with the same JSON-able
spec, so they compute the same table; the progress line is the same too.

    executor = make_executor(cfg.sweep)
    executor.run(jobs, run_trial, on_result)      # run_trial(spec) -> result dict
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.sweep.config import SweepConfig

TrialFn = Callable[[dict], dict]


@dataclass
class Job:
    key: str  # the trial id, printed
    group: str  # trials of one group take about as long (the arm): the ETA averages per group
    spec: dict  # what the trial function needs; JSON-able (it travels to Ray workers)


class Progress:
    """`sweep: 12/96 done, 2 running, 82 left, ETA ~14 min` after every change.

    The ETA sums, over the trials not done, the mean duration of the finished trials of their
    group in this session (else of all groups), divided by the trials running at once."""

    def __init__(self, total: int, done: int, parallel: int, out=sys.stdout):
        self.total, self.done, self.parallel, self.out = total, done, max(1, parallel), out
        self.running: set[str] = set()
        self.seconds: dict[str, list[float]] = {}
        self.left_groups: list[str] = []

    def plan(self, jobs: list[Job], show: bool = True) -> None:
        self.left_groups = [j.group for j in jobs]
        if show or not jobs:
            self.show()

    def start(self, job: Job) -> None:
        self.running.add(job.key)

    def finish(self, job: Job, seconds: float, show: bool = True) -> None:
        self.running.discard(job.key)
        self.left_groups.remove(job.group)
        self.seconds.setdefault(job.group, []).append(seconds)
        self.done += 1
        if show:
            self.show()

    def eta_s(self) -> float | None:
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return None
        mean = sum(every) / len(every)
        work = sum(sum(self.seconds[g]) / len(self.seconds[g]) if g in self.seconds else mean
                   for g in self.left_groups)
        return work / min(self.parallel, max(1, len(self.left_groups)))

    def line(self) -> str:
        left = self.total - self.done - len(self.running)
        eta = self.eta_s()
        shown = "unknown until a trial finishes" if eta is None else _duration(eta)
        return (f"sweep: {self.done}/{self.total} done, {len(self.running)} running, {left} left, "
                f"ETA {shown if self.done < self.total else '-'}")

    def show(self) -> None:
        print(self.line(), file=self.out, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


class SequentialExecutor:
    parallel = 1

    def run(self, jobs: list[Job], fn: TrialFn, on_result: Callable[[Job, dict], None], progress: Progress) -> None:
        progress.plan(jobs, show=False)
        for job in jobs:
            progress.start(job)
            progress.show()
            start = time.monotonic()
            result = fn(job.spec)
            on_result(job, result)
            progress.finish(job, time.monotonic() - start, show=job is jobs[-1])


class RayExecutor:
    """Each trial a Ray task reserving `cpus` CPUs and `gpus` GPUs (fractions share a GPU).

    address None starts a local Ray instance for this sweep (stopped at the end), with this
    checkout on the workers' PYTHONPATH; "auto" or "ray://host:port" joins a running cluster, whose
    workers must be able to import `pipeline` (installed, or `ray job submit --working-dir .`) and
    reach the tracking URI and the run's output folder (a shared file system).
    """

    def __init__(self, address: str | None, cpus: int, gpus: float):
        self.address, self.cpus, self.gpus = address, cpus, gpus
        self.parallel = 1

    def _start(self) -> bool:
        import ray

        if ray.is_initialized():
            return False
        env = None
        if self.address is None:
            root = str(Path(__file__).resolve().parents[2])
            path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
            env = {"env_vars": {"PYTHONPATH": path}}
        ray.init(address=self.address, include_dashboard=False, runtime_env=env, log_to_driver=True)
        return True

    def run(self, jobs: list[Job], fn: TrialFn, on_result: Callable[[Job, dict], None], progress: Progress) -> None:
        import ray

        started = self._start()
        try:
            total = ray.cluster_resources()
            slots = int(total.get("CPU", 1) // self.cpus)
            if self.gpus:
                slots = min(slots, int(total.get("GPU", 0) // self.gpus))
            if slots < 1:
                raise RuntimeError(f"the Ray cluster has {total.get('CPU', 0)} CPU(s) and {total.get('GPU', 0)} GPU(s); "
                                   f"a trial asks for {self.cpus} CPU(s) and {self.gpus} GPU(s) "
                                   "(sweep.cpus_per_trial, sweep.ray.gpus_per_trial)")
            self.parallel = progress.parallel = slots
            remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(fn)
            progress.plan(jobs)
            queue, pending = list(jobs), {}
            while queue or pending:
                while queue and len(pending) < slots:  # submit no more than can run: the progress says what runs
                    job = queue.pop(0)
                    pending[remote.remote(job.spec)] = (job, time.monotonic())
                    progress.start(job)
                progress.show()
                ready, _ = ray.wait(list(pending), num_returns=1)
                job, start = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayError as err:  # the worker died (memory, signal): the trial failed
                    result = {"status": "failed", "error": f"Ray: {str(err).splitlines()[0]}"}
                on_result(job, result)
                progress.finish(job, time.monotonic() - start)
        finally:
            if started:
                ray.shutdown()


def make_executor(sweep: SweepConfig):
    if sweep.executor == "ray":
        return RayExecutor(sweep.ray.address, sweep.cpus_per_trial, sweep.ray.gpus_per_trial)
    return SequentialExecutor()
