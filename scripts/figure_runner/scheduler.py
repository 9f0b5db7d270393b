"""The driver's loop: each idle worker gets the first job that is ready (plan order; a sampling job is
ready once its subject's concept is), so a slow worker holds no one back.

Nothing lost: a job whose server or worker died (ServerLost, a Ray actor error) goes back to the front of
the queue for another worker, up to MAX_LOSSES times. Nothing done twice: a job is recorded in the
manifest the moment its files are written, and jobs the manifest has are never queued; a stop (Ctrl-C,
SIGTERM: ``request_stop``) starts no new job and lets the running ones finish and be recorded, a second
one ends them. A job whose workflow failed is recorded as failed (retried by the next run), and so are
the samples of a subject whose training failed.
"""

from __future__ import annotations

import time
from pathlib import Path

import ray

from .cluster import WORKER_RESTARTS
from .manifest import JobLog, Manifest
from .requests import Inputs, RequestMaker
from .worker import JobFailed, ServerLost

MAX_LOSSES = 3  # a job lost this many times (its server or worker died each time) is failed
PROGRESS_EVERY = 30.0  # seconds between progress lines while nothing finishes
POLL = 1.0  # seconds between looks at a stop request while jobs run


class Scheduler:
    def __init__(self, workers: list, maker: RequestMaker, manifest: Manifest, log: JobLog, inputs: Inputs,
                 concepts_dir: Path | None):
        self.workers = {f"worker-{i}": w for i, w in enumerate(workers)}
        self.maker, self.manifest, self.log, self.inputs = maker, manifest, log, inputs
        self.concepts_dir = concepts_dir
        self.counts = {"done": 0, "skipped": 0, "failed": 0, "left": 0, "lost": 0}
        self.seconds: dict[str, list[float]] = {"train": [], "sample": []}
        self.failed_now: set[str] = set()  # failed in this run (a failure of an earlier run is retried)
        self.stopping = False
        self.started = time.monotonic()

    # -- concepts -----------------------------------------------------------------------------------
    def concept_ready(self, job: dict) -> bool:
        """A sampling job's concept is in the object store (put there from OUT/concepts or --concepts
        the first time a job of the subject asks)."""
        subject = job["subject"]
        if self.inputs.concept_entry(subject):
            return True
        name = self.maker.concept_pattern.format(subject=subject)
        if job["needs"]:
            if not self.manifest.done({"id": job["needs"]}):
                return False
            path = self.manifest.out / self.manifest.jobs[job["needs"]]["files"][0]
        elif self.concepts_dir:
            path = self.concepts_dir / name
        else:
            return True  # the concept comes from the servers' own model folders
        self.inputs.concept(subject, path.read_bytes(), name)
        return True

    def training_failed(self, job: dict) -> bool:
        return job.get("needs") in self.failed_now

    # -- the loop -------------------------------------------------------------------------------------
    def run(self, jobs: list[dict], max_jobs: int | None = None) -> dict:
        todo = []
        for job in jobs:
            if self.manifest.done(job):
                self.counts["skipped"] += 1
            else:
                todo.append(job)
        self.total = len(todo)
        losses: dict[str, int] = {}  # job id -> times lost
        avoid: dict[str, set] = {}  # job id -> workers that lost it
        worker_losses = dict.fromkeys(self.workers, 0)  # in a row; a worker past its restarts is let go
        idle, running, submitted = list(self.workers), {}, 0
        last_line = time.monotonic()
        while todo or running:
            for job in [j for j in todo if j["kind"] == "sample" and self.training_failed(j)]:
                todo.remove(job)
                self.finish_failed(job, "its training job failed; see that job's error")
            for worker in list(idle):
                if self.stopping or (max_jobs is not None and submitted >= max_jobs):
                    break
                job = self.next_job(todo, worker, avoid)
                if job is None:
                    continue
                idle.remove(worker)
                todo.remove(job)
                ref = self.workers[worker].run.remote(self.maker.request(job, self.inputs))
                running[ref] = (job, worker)
                submitted += 1
                self.log.event("start", job["id"], worker=worker)
            if not running:
                break  # nothing can start: --max-jobs reached, or no worker left
            finished, _ = ray.wait(list(running), num_returns=1, timeout=POLL)
            if not finished:
                if time.monotonic() - last_line >= PROGRESS_EVERY:
                    self.progress(todo, running)
                    last_line = time.monotonic()
                continue
            job, worker = running.pop(finished[0])
            outcome = self.collect(job, worker, finished[0])
            worker_losses[worker] = worker_losses[worker] + 1 if outcome == "lost" else 0
            if outcome == "lost":
                losses[job["id"]] = losses.get(job["id"], 0) + 1
                avoid.setdefault(job["id"], set()).add(worker)
                if losses[job["id"]] >= MAX_LOSSES:
                    self.finish_failed(job, f"lost {MAX_LOSSES} times (its server or worker died each time)")
                else:
                    todo.insert(0, job)
            if worker_losses[worker] > WORKER_RESTARTS:
                del self.workers[worker]
                print(f"[run_figure] {worker} lost {worker_losses[worker]} jobs in a row; going on without it", flush=True)
            else:
                idle.append(worker)
            if not any(j["subject"] == job["subject"] for j in todo + [j for j, _ in running.values()]):
                self.inputs.drop_concept(job["subject"])
            self.progress(todo, running)
            last_line = time.monotonic()
        self.counts["left"] = len(todo)
        if self.stopping:
            raise KeyboardInterrupt
        return self.counts

    def request_stop(self, signum, frame) -> None:
        """A signal handler: the first stop drains, a second one ends the running jobs now."""
        if self.stopping:
            raise KeyboardInterrupt
        self.stopping = True
        print("[run_figure] stopping: no new jobs; the running ones finish and are recorded (stop again to end "
              "them now)", flush=True)

    def next_job(self, todo: list[dict], worker: str, avoid: dict[str, set]) -> dict | None:
        """The first ready job this worker has not lost before; a job it lost only when every worker has."""
        fallback = None
        for job in todo:
            if job["kind"] == "sample" and not self.concept_ready(job):
                continue
            if worker not in avoid.get(job["id"], ()):
                return job
            if fallback is None and set(self.workers) <= avoid[job["id"]]:
                fallback = job
        return fallback

    def collect(self, job: dict, worker: str, ref) -> str:
        """The job's result recorded: "done", "failed" or "lost" (to be given to another worker)."""
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # the worker's process died
            return self.lost(job, worker, str(err))
        except ray.exceptions.RayTaskError as err:  # raised in the worker
            if isinstance(err.cause, ServerLost):
                return self.lost(job, worker, str(err.cause))
            self.finish_failed(job, str(err.cause if isinstance(err.cause, JobFailed) else err), worker)
            return "failed"
        try:
            record = self.maker.store(job, result)
        except JobFailed as err:
            self.finish_failed(job, str(err), worker)
            return "failed"
        self.manifest.record(record)
        self.log.event("done", job["id"], worker=worker, seconds=record["seconds"])
        self.counts["done"] += 1
        self.seconds[job["kind"]].append(record["seconds"])
        if job["kind"] == "train":
            self.inputs.concept(job["subject"], result["concept"], self.maker.concept_pattern.format(subject=job["subject"]))
        print(f"[run_figure] {job['id']} done on {worker} in {record['seconds']:.1f} s", flush=True)
        return "done"

    def lost(self, job: dict, worker: str, error: str) -> str:
        self.counts["lost"] += 1
        self.log.event("lost", job["id"], worker=worker, error=error[-2000:])
        print(f"[run_figure] {job['id']} lost on {worker}, queued again: {error.splitlines()[0][:300]}", flush=True)
        return "lost"

    def finish_failed(self, job: dict, error: str, worker: str | None = None) -> None:
        self.failed_now.add(job["id"])
        self.manifest.record({**job, "status": "failed", "error": error, "worker": worker})
        self.log.event("failed", job["id"], worker=worker, error=error[-2000:])
        self.counts["failed"] += 1
        print(f"[run_figure] {job['id']} FAILED: {error[:2000]}", flush=True)

    def progress(self, todo: list[dict], running: dict) -> None:
        """Done, running, failed and the time left: the jobs still to run at this run's mean time per job
        of their kind (of any kind until one has finished), spread over the workers."""
        c = self.counts
        mean = {k: sum(v) / len(v) for k, v in self.seconds.items() if v}
        eta = ""
        if mean:
            fallback = sum(mean.values()) / len(mean)
            left = [j["kind"] for j in todo] + [j["kind"] for j, _ in running.values()]
            seconds = sum(mean.get(kind, fallback) for kind in left) / max(len(self.workers), 1)
            eta = f" · ETA {int(seconds // 60)}m{int(seconds % 60):02d}s"
        print(f"[run_figure] {c['done']}/{self.total} done · {len(running)} running · {c['failed']} failed · "
              f"{len(todo)} to do{eta} ({time.monotonic() - self.started:.0f} s)", flush=True)
