"""Subjects, prompt sets and the jobs of a run.

A job is a plain dict (it goes into the manifest and to the workers) with a deterministic ``id``:

    <subject>/train                     the subject's training (with --train-workflow)
    <subject>/<set>/<NNN>_s<seed>       prompt NNN of the set's file, one seed (a plain param:prompt node)
    <subject>/<set>/all_s<seed>         every prompt of the set's file in one run (a Prompt List)

A prompt set is a name and one prompt file per subject: ``--prompts a.txt`` is the set "a" for every
subject; Table 1's "unstylized" set is prompt_live.txt for live subjects (cats and dogs, DreamBooth's
live-subject prompts) and prompt_nolive.txt for the others, its "stylized" set prompt_style.txt.
"""

from __future__ import annotations

import re
from pathlib import Path

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
LIVE_CLASSES = {"cat", "dog"}  # the DreamBooth subjects the authors' test.py gives the live list
TABLE1_SETS = {"unstylized": ("prompt_live.txt", "prompt_nolive.txt"), "stylized": ("prompt_style.txt",) * 2}


def read_prompts(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_classes(path: Path) -> dict[str, str]:
    """``subject_name,class`` lines (DreamBooth's prompts_and_classes.txt; other lines are ignored)."""
    classes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\s*([\w-]+)\s*,\s*([^,]+?)\s*", line)
        if m and m.group(1) != "subject_name":
            classes[m.group(1)] = m.group(2)
    return classes


def subject_photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


def subject_masks(folder: Path) -> list[Path]:
    """masks/<photo>.png of a subject folder, when it has them (Load Subject Photos reads them)."""
    return sorted((folder / "masks").glob("*.png")) if (folder / "masks").is_dir() else []


def prompt_sets_from_files(files: list[Path], subjects: list[str]) -> dict[str, dict[str, Path]]:
    """Each file a set named by its stem, the same file for every subject."""
    return {path.stem: {s: path for s in subjects} for path in files}


def table1_prompt_sets(folder: Path, subjects: list[str], classes: dict[str, str]) -> dict[str, dict[str, Path]]:
    """The paper's sets from the folder holding prompt_live/nolive/style.txt."""
    return {name: {s: folder / (live if classes[s] in LIVE_CLASSES else other) for s in subjects}
            for name, (live, other) in TABLE1_SETS.items()}


def plan_jobs(subjects: list[str], classes: dict[str, str], prompt_sets: dict[str, dict[str, Path]],
              seeds: list[int], token_pattern: str, prompt_list: bool = False, train: bool = False) -> list[dict]:
    """Training jobs first (they unlock the rest), then subject x set x prompt x seed; with a Prompt List
    subject x set x seed, each job holding the file's lines (``lines``) and their prompts (``prompts``, also
    joined as ``prompt``). A sampling job of a trained subject ``needs`` its training job."""
    jobs = []
    for subject in subjects:
        if train:
            jobs.append({"id": f"{subject}/train", "kind": "train", "subject": subject,
                         "class_word": classes[subject], "token": token_pattern.format(subject=subject)})
    for subject in subjects:
        token = token_pattern.format(subject=subject)
        phrase = f"{token} {classes[subject]}"
        common = {"kind": "sample", "subject": subject, "token": token, "class_word": classes[subject],
                  "needs": f"{subject}/train" if train else None}
        for set_name, files in prompt_sets.items():
            lines = read_prompts(files[subject])
            where = {"prompt_set": set_name, "prompt_file": files[subject].name}
            if prompt_list:
                prompts = [line.replace("{}", phrase) for line in lines]
                for seed in seeds:
                    jobs.append({"id": f"{subject}/{set_name}/all_s{seed}", **common, **where, "index": None,
                                 "seed": seed, "lines": lines, "phrase": phrase, "prompts": prompts,
                                 "prompt": "\n".join(prompts)})
                continue
            for index, line in enumerate(lines):
                for seed in seeds:
                    jobs.append({"id": f"{subject}/{set_name}/{index:03d}_s{seed}", **common, **where,
                                 "index": index, "seed": seed, "prompt": line.replace("{}", phrase)})
    return jobs
