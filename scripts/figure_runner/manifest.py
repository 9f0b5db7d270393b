"""What a run has done: ``OUT/manifest.json`` (the settings and one record per finished or failed job,
rewritten atomically after every job) and ``OUT/jobs.log`` (one JSON line per job start, end, failure or
loss, appended: the audit trail across restarts)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from eqdiff_core.files import write_atomic

from .params import RunnerError


class Manifest:
    def __init__(self, out: Path, settings: dict):
        self.out = out
        self.path = out / "manifest.json"
        self.settings = settings
        self.jobs: dict[str, dict] = {}

    @classmethod
    def open(cls, out: Path, settings: dict) -> "Manifest":
        """The run in ``out``; refused when it was made with other settings."""
        manifest = cls(out, settings)
        if manifest.path.exists():
            saved = json.loads(manifest.path.read_text())
            if saved.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                                 if settings.get(k) != saved.get("settings", {}).get(k))
                raise RunnerError(f"{out} holds a run with other settings ({', '.join(changed)}); resume it with the "
                                  "same arguments or use another --out")
            manifest.jobs = saved["jobs"]
        return manifest

    def done(self, job: dict) -> bool:
        """Finished with this very prompt, and its files are still there."""
        record = self.jobs.get(job["id"])
        return bool(record and record.get("status") == "done" and record.get("prompt") == job.get("prompt")
                    and record.get("files") and all((self.out / f).is_file() for f in record["files"]))

    def record(self, record: dict) -> None:
        self.jobs[record["id"]] = record
        write_atomic(self.path, json.dumps({"settings": self.settings, "jobs": self.jobs}, indent=1))


class JobLog:
    """Appends events; a line is written whole (one write call) and flushed at once."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")

    def event(self, event: str, job_id: str, **details) -> None:
        self.file.write(json.dumps({"time": round(time.time(), 3), "event": event, "job": job_id, **details}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
