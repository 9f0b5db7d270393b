"""The table in the paper's layout: one row per subject (then the mean over subjects), CLIP-T, CLIP-I and
DINO-I for each prompt set side by side (Table 1: unstylized, then stylized), as ``OUT/table.csv``,
``OUT/table.md`` and ``OUT/table.png``; and ``OUT/run_info.json``, what the run used: versions, seeds,
model files, workflows and prompt files with their SHA-256, each session's workers."""

from __future__ import annotations

import hashlib
import io
import json
import platform
from importlib import metadata
from pathlib import Path

from eqdiff_core.files import write_atomic

COLUMNS = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino_i", "DINO-I"))
TABLE_FILES = ("table.csv", "table.md", "table.png")


def wide_rows(rows: list[dict], classes: dict[str, str]) -> list[dict]:
    """Long rows (subject x prompt set [x output]) as one row per subject, the mean row last."""
    groups = list(dict.fromkeys("/".join(filter(None, (r["prompt_set"], r.get("output")))) for r in rows))
    table: dict[str, dict] = {}
    for r in rows:
        group = "/".join(filter(None, (r["prompt_set"], r.get("output"))))
        line = table.setdefault(r["subject"], {"subject": r["subject"], "class": classes.get(r["subject"], "")})
        line |= {f"{group} {title}": r[key] for key, title in COLUMNS}
    header = ["subject", "class"] + [f"{g} {title}" for g in groups for _, title in COLUMNS]
    return [{k: line.get(k, float("nan")) for k in header} for line in table.values()]


def markdown(rows: list[dict]) -> str:
    header = list(rows[0])
    cells = [[f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


def write_table(out: Path, rows: list[dict], classes: dict[str, str]) -> None:
    from eqdiff_core.metrics import render_table, rows_to_csv

    wide = wide_rows(rows, classes)
    write_atomic(out / "table.csv", rows_to_csv(wide))
    write_atomic(out / "table.md", markdown(wide))
    png = io.BytesIO()
    render_table(wide).save(png, format="PNG")
    write_atomic(out / "table.png", png.getvalue())
    print(f"[table] wrote {', '.join(str(out / f) for f in TABLE_FILES)}", flush=True)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a model folder (a Hugging Face folder is small apart from its weights)."""
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "ray", "numpy", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_run_info(out: Path, info: dict, session: dict) -> None:
    """``info`` (what does not change between sessions of a run) replaced, ``session`` appended."""
    path = out / "run_info.json"
    sessions = json.loads(path.read_text()).get("sessions", []) if path.exists() else []
    write_atomic(path, json.dumps({**info, "sessions": sessions + [session]}, indent=1))
