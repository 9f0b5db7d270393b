"""The JSON report of a mutation run (scripts/mutation.sh): per module of the mutated folder the mutants
killed, survived, reached by no test and timed out, the score, the date, the tool version, and every
mutant that was not killed with its diff, marked equivalent where the equivalence list says why, or
GPU-only where the GPU list names the cuda-marked test that tells it apart on a CUDA machine (such a
mutant changes only where a tensor lives; on a CPU-only run it survives and counts as survived).

Run with the mutation venv's Python from the folder mutmut ran in (it reads the results in mutants/):
the repository root for eqdiff_core/, .mutation/boundary/ for nodes/comfyui/.
Score: (killed + timeout) / (mutants run - equivalent); mutants not run yet are counted apart. A timeout is a mutant that made the tests run
far longer than without it (mutmut's limit: timeout_multiplier in setup.cfg x (the tests' time + 1 s)): a
detected change. An entry of either list applies only while the mutant's changed lines are still the ones
it names (``mutated``), so a stale entry shows up as a plain survivor.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import mutmut
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as scripts/mutation_report.py
from eqdiff_core.files import write_atomic  # noqa: E402

DETECTED = ("killed", "timeout")


def changed_lines(diff: str) -> list[str]:
    """The mutant's lines of a unified diff, stripped (without the +++ header)."""
    return [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]


def module_results(path: Path, equivalent: dict, gpu_only: dict) -> tuple[dict, list[dict]]:
    data = SourceFileMutationData(path=path)
    data.load()
    counts = Counter(status_by_exit_code[code] for code in data.exit_code_by_key.values())
    listed = []
    for name, code in sorted(data.exit_code_by_key.items()):
        status = status_by_exit_code[code]
        if status in DETECTED or status == "not checked":
            continue
        diff = get_diff_for_mutant(name, path=path)
        entry = {"mutant": name, "status": status, "diff": diff}
        for label, known in (("equivalent", equivalent.get(name)), ("gpu_only", gpu_only.get(name))):
            if known and known["mutated"] == changed_lines(diff):
                entry[label] = known["reason"]
        listed.append(entry)
    total = sum(counts.values())
    n_equivalent = sum("equivalent" in e for e in listed)
    detected = sum(counts[s] for s in DETECTED)
    tested = total - counts["not checked"] - n_equivalent
    summary = {
        "mutants": total, "not_run": counts["not checked"], "killed": counts["killed"], "timeout": counts["timeout"],
        "survived": counts["survived"], "no_tests": counts["no tests"],
        "other": {s: n for s, n in counts.items()
                  if s not in ("killed", "timeout", "survived", "no tests", "not checked")},
        "equivalent": n_equivalent, "gpu_only": sum("gpu_only" in e for e in listed),
        "score": round(detected / tested, 4) if tested > 0 else None,
    }
    return summary, listed


def unchecked(source: str, modules: list[str]) -> list[str]:
    """The mutants of these modules (<source>/<module>.py) that have no result yet."""
    names = []
    for module in modules:
        data = SourceFileMutationData(path=Path(source) / f"{module}.py")
        data.load()
        names += [name for name, code in data.exit_code_by_key.items() if code is None]
    return sorted(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unchecked", nargs="+", metavar="MODULE",
                        help="only print the names of these modules' mutants without a result, one a line")
    parser.add_argument("--source", default="eqdiff_core", help="the mutated folder (mutmut's source_paths)")
    parser.add_argument("--tests", default="tests/unit (the tests that reach each mutated function)",
                        help="what the mutants were run against, for the report")
    parser.add_argument("--tests-folder", default="tests/unit",
                        help="the tests' folder: uncommitted changes there mark the report's commit")
    parser.add_argument("--out")
    parser.add_argument("--equivalent", help="JSON: mutant name -> {mutated: [lines], reason}")
    parser.add_argument("--gpu-only", help="JSON: mutant name -> {mutated: [lines], reason naming the cuda test}")
    parser.add_argument("--mutmut-version")
    args = parser.parse_args()
    if args.unchecked:
        print("\n".join(unchecked(args.source, args.unchecked)))
        return
    if mutmut.__version__ != args.mutmut_version:
        raise SystemExit(f"mutmut {mutmut.__version__} is installed, the script pins {args.mutmut_version}")
    equivalent = json.loads(Path(args.equivalent).read_text())
    gpu_only = json.loads(Path(args.gpu_only).read_text()) if args.gpu_only else {}
    modules, not_killed = {}, []
    for path in sorted(Path(args.source).glob("*.py")):
        if (Path("mutants") / (str(path) + ".meta")).exists():
            summary, listed = module_results(path, equivalent, gpu_only)
            if summary["mutants"]:  # not_run counts the mutants of modules not run yet, too
                modules[str(path)] = summary
                not_killed += listed
    totals = Counter()
    for summary in modules.values():
        totals.update({k: v for k, v in summary.items() if isinstance(v, int)})
    detected = totals["killed"] + totals["timeout"]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", args.source, args.tests_folder],
                                capture_output=True, text=True).stdout.strip())
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "tool": f"mutmut {mutmut.__version__}",
        "tests": args.tests,
        "commit": commit + (f"+uncommitted changes in {args.source}/ or {args.tests_folder}/" if dirty else ""),
        "score_definition": "(killed + timeout) / (mutants run - equivalent); not_run: mutants without a "
                            "result yet (a run stopped by its time limit; scripts/mutation.sh --continue); gpu_only: "
                            "survivors that a cuda-marked test tells apart on a CUDA machine, counted as survived",
        "total": {**{k: totals[k] for k in ("mutants", "not_run", "killed", "timeout", "survived", "no_tests",
                                            "equivalent", "gpu_only")},
                  "score": round(detected / (totals["mutants"] - totals["not_run"] - totals["equivalent"]), 4)
                  if totals["mutants"] - totals["not_run"] > totals["equivalent"] else None},
        "modules": modules,
        "not_killed": not_killed,
    }
    out = Path(args.out)
    write_atomic(out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    t = report["total"]
    print(f"[mutation] {t['mutants']} mutants ({t['not_run']} not run): {t['killed']} killed, {t['timeout']} timeout, {t['survived']} "
          f"survived ({t['equivalent']} equivalent, {t['gpu_only']} told apart only on a GPU), {t['no_tests']} reached "
          f"by no test; score {t['score']}")
    print(f"[mutation] report: {out}")


if __name__ == "__main__":
    main()
