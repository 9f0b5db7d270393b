"""Headless figure runner: API workflows over DreamBooth subjects x prompt lists x seeds on ComfyUI servers
owned by Ray actors (one per GPU, or --cpu-servers on a machine without one), then CLIP-T / CLIP-I /
DINO-I per subject and the table.

Table 1 of the paper in one command (trains every subject with workflows/api/train.json, samples the
live or nolive list and the style list with workflows/api/table1_metrics.json, measures, writes the table):

    python scripts/run_figure.py --table1 --subjects /data/dreambooth --checkpoint /models/v1-5.safetensors \\
        --clip-model /models/clip-vit-base-patch32 --dino-model /models/dino-vits16 --out runs/table1

Any workflow over any prompt files:

    python scripts/run_figure.py --workflow workflows/api/generate.json --concepts runs/table1/concepts \\
        --subjects /data/dreambooth --subset backpack_dog cat --prompts prompts.txt --seeds 0 1 ... --out runs/x

Workers. Without --ray-address a local Ray starts with one ComfyUI server per GPU (--cpu-servers CPU
servers when there is none) and ends with the run; with --ray-address the run joins that cluster and
uses one server per GPU in it. Each worker starts its own server on its node with its own port and folders
(under --worker-dir); an idle worker takes the next job. Files reach the servers through their HTTP API
from Ray's object store: subject photos and masks, concepts (trained ones and --concepts).

Jobs. With a training workflow one job trains each subject (its concept goes to OUT/concepts/ and to the
servers that sample it); one sampling job per subject x prompt set x prompt x seed, or x seed with a
Prompt List. A subject's samples wait for its concept. See figure_runner/params.py for the param: titles
and figure_runner/plan.py for the job ids.

Resume. OUT/manifest.json records every finished job (its files, prompt id, seconds, worker), written
atomically after each job; OUT/jobs.log has every start, end, failure and loss. A job whose server or
worker dies is given to another worker; a re-run with the same settings skips finished jobs whose files
are there and retries failed ones, other settings in the same OUT are refused; a finished run re-run does
nothing. --max-jobs N stops after N new jobs. Images: OUT/images/<subject>/<prompt set>/<NNN>_s<seed>_<k>.png.

Results. When every job is done: OUT/metrics.csv and metrics.json (figure_runner/metrics.py), the table
OUT/table.csv, table.md, table.png and OUT/run_info.json (versions, seeds, model files, workers).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import tomllib
from pathlib import Path

import ray
from comfy_server import DEFAULT_ENV

from . import cluster, metrics, plan, table
from . import params as P
from .manifest import JobLog, Manifest
from .params import RunnerError
from .requests import Inputs, RequestMaker, Workflow
from .scheduler import Scheduler

REPO = Path(__file__).resolve().parents[2]
TABLE1_WORKFLOW = REPO / "workflows" / "api" / "table1_metrics.json"
TABLE1_TRAIN_WORKFLOW = REPO / "workflows" / "api" / "train.json"
PAPER_PROMPTS = REPO / "workflows" / "prompts"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_argument_group("what to run")
    what.add_argument("--table1", action="store_true",
                      help="the paper's Table 1: --workflow table1_metrics.json, --train-workflow train.json (unless "
                      "--concepts), the prompt sets unstylized (live or nolive) and stylized from --prompts-dir")
    what.add_argument("--workflow", type=Path, help="API-format sampling workflow with param: titles")
    what.add_argument("--train-workflow", type=Path, help="API-format training workflow (param:subject, Save Concept "
                      "titled param:name): one training per subject before its samples")
    what.add_argument("--concepts", type=Path, help="folder of existing concept files (named by --concept) to "
                      "sample with instead of training")
    what.add_argument("--subjects", required=True, type=Path, help="folder of subject photo folders (DreamBooth's)")
    what.add_argument("--subset", nargs="+", help="subject names (default: every sub-folder)")
    what.add_argument("--classes", type=Path, help="subject_name,class file (default: SUBJECTS/prompts_and_classes.txt)")
    what.add_argument("--prompts", nargs="+", type=Path, help="prompt list file(s), each a prompt set; {} = subject")
    what.add_argument("--prompts-dir", type=Path, default=PAPER_PROMPTS,
                      help="with --table1: the folder of prompt_live.txt, prompt_nolive.txt, prompt_style.txt")
    what.add_argument("--seeds", nargs="+", type=int, default=[0], help="one job per seed (param:seed)")
    values = parser.add_argument_group("values written into the workflows (param: titles)")
    values.add_argument("--checkpoint", help="checkpoint: a file (its folder is given to every server) or a name the "
                        "servers list (param:checkpoint)")
    values.add_argument("--steps", type=int, help="sampling steps (param:steps)")
    values.add_argument("--size", type=int, help="image width and height (param:size)")
    values.add_argument("--concept", default="{subject}.safetensors", help="concept file name pattern (param:concept)")
    values.add_argument("--token", default="<{subject}>", help="concept token pattern (param:token)")
    values.add_argument("--name", default="{subject}", help="trained concept name pattern (param:name)")
    values.add_argument("--train-steps", type=int, help="FDTE Trainer steps (param:train_steps)")
    values.add_argument("--train-size", type=int, help="training photo size (param:train_size)")
    values.add_argument("--train-precision", choices=("bf16", "fp32"), help="FDTE Trainer precision "
                        "(param:train_precision; fp32 on a CPU or a GPU without bf16)")
    values.add_argument("--class-images", type=int, help="class images for prior preservation (param:class_images; "
                        "the authors: 200)")
    values.add_argument("--reference-index", type=int, default=0, help="which sorted photo is the reference")
    run = parser.add_argument_group("the run")
    run.add_argument("--out", required=True, type=Path, help="run folder (images, concepts, manifest, metrics, table)")
    run.add_argument("--max-jobs", type=int, help="stop after this many new jobs (resume later)")
    run.add_argument("--timeout", type=float, default=3600, help="seconds one job may take")
    run.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or head:6379) instead of "
                     "starting a local one")
    run.add_argument("--cpu-servers", type=int, default=1, help="CPU servers when the cluster has no GPU")
    run.add_argument("--comfy", type=Path, default=DEFAULT_ENV / "ComfyUI", help="ComfyUI with this pack, on every node")
    run.add_argument("--comfy-python", type=Path, default=DEFAULT_ENV / "venv" / "bin" / "python",
                     help="the Python that runs that ComfyUI, on every node")
    run.add_argument("--extra-model-paths", nargs="+", type=Path, default=[],
                     help="ComfyUI extra_model_paths YAML files for every server (paths valid on the workers)")
    run.add_argument("--worker-dir", type=Path, help="where each server's folders and log go (default OUT/workers)")
    run.add_argument("--ray-temp-dir", type=Path, help="a local Ray's session folder (default Ray's /tmp/ray); "
                     "keep it short, Ray's socket paths must fit in 107 characters")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--clip-model", type=Path, help="local Hugging Face CLIP folder (e.g. clip-vit-base-patch32)")
    metrics.add_argument("--dino-model", type=Path, help="local Hugging Face DINO folder (e.g. dino-vits16)")
    metrics.add_argument("--preprocessing", choices=("custom_diffusion", "model_folder"), default="custom_diffusion")
    metrics.add_argument("--clip-t-weight", type=float, default=2.5, help="w in CLIP-T = w * max(cos, 0)")
    metrics.add_argument("--metrics-device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    metrics.add_argument("--no-metrics", action="store_true", help="only generate")
    args = parser.parse_args(argv)
    if args.table1:
        if args.prompts:
            parser.error("--table1 samples the paper's prompt lists; give another folder of them with --prompts-dir")
        args.workflow = args.workflow or TABLE1_WORKFLOW
        if args.concepts is None:
            args.train_workflow = args.train_workflow or TABLE1_TRAIN_WORKFLOW
    elif args.workflow is None or not args.prompts:
        parser.error("give --workflow and --prompts, or --table1")
    if args.train_workflow and args.concepts:
        parser.error("give --train-workflow (train every subject) or --concepts (use trained ones), not both")
    args.out = args.out.resolve()
    args.worker_dir = (args.worker_dir or args.out / "workers").resolve()
    return args


def check_subjects(args) -> tuple[list[str], dict[str, str]]:
    if not args.subjects.is_dir():
        raise RunnerError(f"--subjects: {args.subjects} is not a folder")
    subjects = args.subset or sorted(p.name for p in args.subjects.iterdir() if p.is_dir() and plan.subject_photos(p))
    for subject in subjects:
        folder = args.subjects / subject
        if not folder.is_dir() or not plan.subject_photos(folder):
            raise RunnerError(f"--subset: {folder} is not a folder of photos")
        if args.reference_index >= len(plan.subject_photos(folder)):
            raise RunnerError(f"--reference-index {args.reference_index}: {subject} has "
                              f"{len(plan.subject_photos(folder))} photos")
        if args.concepts and not (args.concepts / args.concept.format(subject=subject)).is_file():
            raise RunnerError(f"--concepts: {args.concepts / args.concept.format(subject=subject)} does not exist; "
                              "train the subject (--train-workflow) or name the files with --concept")
    classes_path = args.classes or args.subjects / "prompts_and_classes.txt"
    if not classes_path.is_file():
        raise RunnerError(f"{classes_path} does not exist; give --classes with 'subject_name,class' lines")
    classes = plan.read_classes(classes_path)
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        raise RunnerError(f"{classes_path} has no class word for {', '.join(unknown)}")
    return subjects, classes


def check_prompts(args, subjects, classes, prompt_list: bool) -> dict[str, dict[str, Path]]:
    if args.table1:
        sets = plan.table1_prompt_sets(args.prompts_dir, subjects, classes)
    else:
        sets = plan.prompt_sets_from_files(args.prompts, subjects)
    for path in dict.fromkeys(p for files in sets.values() for p in files.values()):
        option = "--prompts-dir" if args.table1 else "--prompts"
        if not path.is_file() or not plan.read_prompts(path):
            raise RunnerError(f"{option}: {path} is not a file of prompts")
        bad = [line for line in plan.read_prompts(path) if "{}" not in line]
        if prompt_list and bad:
            raise RunnerError(f"{option}: {path} has a line without {{}} ('{bad[0]}'); the Prompt List needs {{}} "
                              "where the subject goes in every line")
    return sets


def check_metric_models(args) -> None:
    if args.no_metrics:
        return
    if args.clip_model is None or args.dino_model is None:
        raise RunnerError("give --clip-model and --dino-model (local model folders) or --no-metrics")
    from eqdiff_core import metrics as core  # torch and transformers: loaded only when metrics are wanted

    try:
        core.check_model_folder(str(args.clip_model), "clip", args.preprocessing)
        core.check_model_folder(str(args.dino_model), "dino", args.preprocessing)
    except core.MetricModelError as err:
        raise RunnerError(str(err)) from None


def read_workflows(args) -> tuple[Workflow, Workflow | None]:
    sample = Workflow.read(args.workflow, P.SAMPLING_PARAMS, "--workflow")
    train = Workflow.read(args.train_workflow, P.TRAINING_PARAMS, "--train-workflow") if args.train_workflow else None
    if (train or args.concepts) and "concept" not in sample.params:
        raise RunnerError("--workflow has no node titled param:concept (Load Concept), so the trained or given "
                          "concepts would not reach it")
    carried = set(sample.params) | set(train.params if train else ())
    for name in ("checkpoint", "steps", "size", "train_steps", "train_size", "train_precision", "class_images"):
        if getattr(args, name) is not None and name not in carried:
            raise RunnerError(f"no workflow has a node titled param:{name}, so --{name.replace('_', '-')} cannot be "
                              "applied")
    return sample, train


def checkpoint_value(args) -> tuple[str | None, dict]:
    """The name the workflows get and the model folders the servers are given."""
    if args.checkpoint and Path(args.checkpoint).is_file():
        path = Path(args.checkpoint).resolve()
        return path.name, {"checkpoints": str(path.parent)}
    return args.checkpoint, {}


def prepare(args) -> tuple[list[dict], RequestMaker, Manifest, dict, dict]:
    """Everything checked and planned before a worker starts: the jobs, the request maker with the values
    of the options, the manifest, the model folders for the servers and the run's description."""
    subjects, classes = check_subjects(args)
    sample, train = read_workflows(args)
    prompt_list = P.uses_prompt_list(sample.nodes, sample.params)
    sets = check_prompts(args, subjects, classes, prompt_list)
    check_metric_models(args)
    jobs = plan.plan_jobs(subjects, classes, sets, args.seeds, args.token, prompt_list, train=train is not None)
    checkpoint, model_folders = checkpoint_value(args)
    given = {"checkpoint": checkpoint, "steps": args.steps, "size": args.size, "train_steps": args.train_steps,
             "train_size": args.train_size, "train_precision": args.train_precision,
             "class_images": args.class_images}
    settings = {"workflow": sample.digest(), "train_workflow": train.digest() if train else None,
                "concepts": str(args.concepts.resolve()) if args.concepts else None, "concept": args.concept,
                "token": args.token, "name": args.name, "reference_index": args.reference_index, **given}
    manifest = Manifest.open(args.out, settings)
    maker = RequestMaker(args.out, args.subjects, sample, train, {k: v for k, v in given.items() if v is not None},
                         args.concept, args.name, args.reference_index, args.timeout)
    info = {"subjects": subjects, "classes": classes, "sets": sets, "sample": sample, "train": train,
            "settings": settings}
    return jobs, maker, manifest, model_folders, info


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        jobs, maker, manifest, model_folders, planned = prepare(args)
    except RunnerError as err:
        print(f"[run_figure] {err}", file=sys.stderr)
        return 2
    if any(not manifest.done(j) for j in jobs):
        try:
            info = run_info(args, **planned)
            counts = run_on_ray(args, maker, manifest, jobs, model_folders, info)
        except RunnerError as err:
            print(f"[run_figure] {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("[run_figure] stopped; run the same command again to resume", file=sys.stderr)
            return 130
        print(f"[run_figure] {counts['done']} done, {counts['skipped']} already done, {counts['failed']} failed, "
              f"{counts['left']} left (of {len(jobs)}); {counts['lost']} lost to a dead server or worker and given "
              "to another", flush=True)
        if counts["failed"]:
            print("[run_figure] run again to retry the failed jobs", file=sys.stderr)
            return 1
        if counts["left"]:
            print(f"[run_figure] stopped with {counts['left']} jobs left (--max-jobs, or no worker left: see above); "
                  "run again to continue")
            return 0
    else:
        print(f"[run_figure] all {len(jobs)} jobs are done")
    if not args.no_metrics:
        write_results(args, manifest, jobs, planned["classes"])
    return 0


def run_on_ray(args, maker: RequestMaker, manifest: Manifest, jobs: list[dict], model_folders: dict, info: dict) -> dict:
    """Ray started or joined, the workers, the jobs; everything stopped again, also on Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl-C while Ray starts
    settings = {"comfy_dir": str(args.comfy), "python": str(args.comfy_python), "work_root": str(args.worker_dir),
                "model_folders": model_folders, "extra_model_paths": [str(p.resolve()) for p in args.extra_model_paths],
                "start_timeout": 600}
    log = JobLog(args.out / "jobs.log")
    workers = []
    try:
        cluster.connect(args.ray_address, args.cpu_servers, args.ray_temp_dir)
        print(f"[run_figure] Ray {'at ' + args.ray_address if args.ray_address else 'local'}: starting the servers",
              flush=True)
        workers, described = cluster.start_workers(args.cpu_servers, settings)
        for w in described:
            print(f"[run_figure] {w['worker']}: ComfyUI {w['comfyui']} on {w['node']} ({w['device']}), {w['url']}, "
                  f"folder {w['folder']}", flush=True)
        started = time.time()
        scheduler = Scheduler(workers, maker, manifest, log, Inputs(), args.concepts)
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, scheduler.request_stop)
        counts = scheduler.run(jobs, args.max_jobs)
        table.write_run_info(args.out, info, {"started": started, "seconds": round(time.time() - started, 1),
                                              "ray": args.ray_address or "local", "workers": described,
                                              "counts": counts})
        return counts
    finally:
        for stop in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stop, signal.default_int_handler)  # while stopping, a stop ends at once
        log.close()
        if ray.is_initialized():
            cluster.stop_workers(workers)
            ray.shutdown()


def run_info(args, subjects, classes, sets, sample: Workflow, train: Workflow | None, settings: dict) -> dict:
    """What the table rests on, apart from the workers (recorded per session)."""
    def files(paths):
        return {str(p): table.sha256(p) for p in dict.fromkeys(paths)}

    info = {"settings": settings, "seeds": args.seeds, "subjects": {s: classes[s] for s in subjects},
            "prompt_sets": {name: {s: str(p) for s, p in per.items()} for name, per in sets.items()},
            "prompt_files": files(p for per in sets.values() for p in per.values()),
            "workflows": files([sample.path] + ([train.path] if train else [])),
            "driver": table.versions(), "pack_version": pack_version()}
    if args.checkpoint and Path(args.checkpoint).is_file():
        info["checkpoint"] = {"file": str(Path(args.checkpoint).resolve()), "sha256": table.sha256(Path(args.checkpoint))}
    if args.concepts:
        info["concept_files"] = files(args.concepts / args.concept.format(subject=s) for s in subjects)
    if not args.no_metrics:
        info["metric_models"] = {"clip": table.folder_files(args.clip_model), "dino": table.folder_files(args.dino_model)}
    return info


def pack_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def write_results(args, manifest: Manifest, jobs: list[dict], classes: dict[str, str]) -> None:
    """The metrics (measured once per set of images) and the table; nothing when both are up to date."""
    records = [manifest.jobs[j["id"]] for j in jobs if j["kind"] == "sample"]
    settings = {"clip_model": str(args.clip_model.resolve()), "dino_model": str(args.dino_model.resolve()),
                "preprocessing": args.preprocessing, "clip_t_weight": args.clip_t_weight, "device": args.metrics_device}
    rows, measured = metrics.compute(args.out, args.subjects, records, settings)
    if measured or not all((args.out / f).is_file() for f in table.TABLE_FILES):
        table.write_table(args.out, rows, classes)
