"""The figure runner without a server or Ray: the param: convention, the jobs and their ids, Table 1's prompt
sets, the manifest, the table layout, and the errors that stop a run before anything starts."""

import json

import pytest

from figure_runner import cli, params as P, plan, table
from figure_runner.manifest import Manifest

WORKFLOW = {
    "1": {"class_type": "EqDiffLoadSubject", "inputs": {"folder": "backpack_dog", "size": 512},
          "_meta": {"title": "param:subject Subject photos"}},
    "2": {"class_type": "EqDiffFDTETrainer", "inputs": {"class_word": "dog", "name": "x", "steps": 600},
          "_meta": {"title": "param:class_word,name,train_steps FDTE Trainer"}},
    "3": {"class_type": "EqDiffPromptList", "inputs": {"list": "nolive", "subject": "<x> dog", "custom_prompts": "",
                                                       "first_index": 3, "count": 1, "images_per_prompt": 1},
          "_meta": {"title": "param:prompt Prompts"}},
    "4": {"class_type": "EqDiffEquilibratedSampler", "inputs": {"seed": 0, "steps": 50},
          "_meta": {"title": "param:seed,steps Sampler"}},
    "5": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a", "images": ["4", 0]},
          "_meta": {"title": "param:output Save A"}},
    "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b"}, "_meta": {"title": "param:output Save A"}},
    "7": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
}


def test_training_parameters_and_the_prompt_list_are_filled(tmp_path):
    params = P.find_params(WORKFLOW)
    assert params["train_steps"] == ["2"] and params["subject"] == ["1"] and P.uses_prompt_list(WORKFLOW, params)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {} in the snow\r\n\r\n{} on the beach \r\n")
    (job,) = plan.plan_jobs(["cat2"], {"cat2": "cat"}, plan.prompt_sets_from_files([prompts], ["cat2"]), [7],
                            "<{subject}>", prompt_list=True)
    assert job["id"] == "cat2/p/all_s7" and job["prompts"] == ["a <cat2> cat in the snow", "<cat2> cat on the beach"]
    filled = P.fill(WORKFLOW, params, {"subject": "eqdiff_runner/cat2", "class_word": "cat", "name": "cat2",
                                       "train_steps": 5, "steps": 2, "seed": 7, "prompt": job["prompt"]})
    P.fill_prompt_list(filled, params, job["lines"], job["phrase"])
    assert filled["1"]["inputs"]["folder"] == "eqdiff_runner/cat2"
    assert filled["2"]["inputs"] == {"class_word": "cat", "name": "cat2", "steps": 5}  # train_steps, not steps
    assert filled["4"]["inputs"] == {"seed": 7, "steps": 2}
    assert filled["3"]["inputs"] == {"list": "custom", "subject": "<cat2> cat", "first_index": 0, "count": 0,
                                     "custom_prompts": "a {} in the snow\n{} on the beach", "images_per_prompt": 1}
    assert WORKFLOW["2"]["inputs"]["steps"] == 600, "the workflow itself is not changed"
    assert P.output_names(WORKFLOW, params) == {"5": "Save_A", "6": "Save_A_6"}
    assert set(P.needed_by(WORKFLOW, ["5"])) == {"4", "5"}, "the preview and the other save are left out"


def test_jobs_have_deterministic_ids_and_samples_need_their_training(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {} in the snow\nwatercolor of a {}")
    jobs = plan.plan_jobs(["dog"], {"dog": "dog"}, plan.prompt_sets_from_files([prompts], ["dog"]), [0, 1],
                          "<{subject}>", train=True)
    assert [j["id"] for j in jobs] == ["dog/train", "dog/p/000_s0", "dog/p/000_s1", "dog/p/001_s0", "dog/p/001_s1"]
    assert {j["needs"] for j in jobs[1:]} == {"dog/train"} and jobs[3]["prompt"] == "watercolor of a <dog> dog"
    assert jobs == plan.plan_jobs(["dog"], {"dog": "dog"}, plan.prompt_sets_from_files([prompts], ["dog"]), [0, 1],
                                  "<{subject}>", train=True)


def test_table1_gives_live_subjects_the_live_list():
    sets = plan.table1_prompt_sets(cli.PAPER_PROMPTS, ["cat2", "teapot"], {"cat2": "cat", "teapot": "teapot"})
    assert {s: p.name for s, p in sets["unstylized"].items()} == {"cat2": "prompt_live.txt", "teapot": "prompt_nolive.txt"}
    assert {p.name for p in sets["stylized"].values()} == {"prompt_style.txt"}
    assert [len(plan.read_prompts(p)) for p in (sets["unstylized"]["cat2"], sets["unstylized"]["teapot"],
                                                sets["stylized"]["cat2"])] == [55, 55, 22]


@pytest.mark.parametrize("change,message", [
    (lambda w: w["3"]["_meta"].update(title="Prompts"), "a workflow with a Prompt List must title it"),
    (lambda w: w["3"]["_meta"].update(title="param:prompt,seed Prompts"), "a Prompt List can only be param:prompt"),
    (lambda w: w["2"]["_meta"].update(title="param:subject Trainer"), "has none of the inputs folder"),
])
def test_bad_titles_are_refused(change, message):
    workflow = json.loads(json.dumps(WORKFLOW))
    change(workflow)
    with pytest.raises(P.RunnerError, match=message):
        P.find_params(workflow)


def test_a_training_workflow_needs_a_save_concept():
    with pytest.raises(P.RunnerError, match="no Save Concept"):
        P.find_params(WORKFLOW, P.TRAINING_PARAMS, "--train-workflow")


def test_the_manifest_refuses_other_settings_and_knows_what_is_done(tmp_path):
    manifest = Manifest.open(tmp_path, {"steps": 2})
    job = {"id": "dog/p/000_s0", "prompt": "a dog"}
    assert not manifest.done(job)
    (tmp_path / "a.png").write_bytes(b"png")
    manifest.record({**job, "status": "done", "files": ["a.png"]})
    again = Manifest.open(tmp_path, {"steps": 2})
    assert again.done(job) and not again.done({**job, "prompt": "another prompt"})
    (tmp_path / "a.png").unlink()
    assert not again.done(job), "a finished job whose file is gone is run again"
    with pytest.raises(P.RunnerError, match=r"other settings \(steps\)"):
        Manifest.open(tmp_path, {"steps": 3})


def test_the_table_has_a_row_per_subject_and_the_sets_side_by_side(tmp_path):
    scores = lambda v: {"clip_t": v, "clip_t_cosine": v / 2.5, "clip_i": v, "dino_i": v}  # noqa: E731
    rows = [{"subject": s, "prompt_set": p, **scores(v)} for s, p, v in
            [("cat", "unstylized", 0.8), ("cat", "stylized", 0.7), ("mean", "unstylized", 0.8), ("mean", "stylized", 0.7)]]
    wide = table.wide_rows(rows, {"cat": "cat"})
    assert list(wide[0]) == ["subject", "class", "unstylized CLIP-T", "unstylized CLIP-I", "unstylized DINO-I",
                             "stylized CLIP-T", "stylized CLIP-I", "stylized DINO-I"]
    assert [r["subject"] for r in wide] == ["cat", "mean"] and wide[0]["stylized DINO-I"] == 0.7
    assert table.markdown(wide).splitlines()[2] == "| cat | cat | 0.800 | 0.800 | 0.800 | 0.700 | 0.700 | 0.700 |"


def test_bad_arguments_stop_the_run_before_anything_starts(tmp_path, capsys):
    subjects = tmp_path / "subjects"
    (subjects / "dog").mkdir(parents=True)
    (subjects / "dog" / "00.jpg").write_bytes(b"")
    (subjects / "prompts_and_classes.txt").write_text("dog,dog\n")
    workflow = tmp_path / "w.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {} in the snow\na dog on the beach")
    base = ["--subjects", str(subjects), "--prompts", str(prompts), "--no-metrics", "--out", str(tmp_path / "out"),
            "--workflow", str(workflow)]
    workflow.write_text(json.dumps(WORKFLOW))
    assert cli.main(base) == 2
    assert "--prompts: " in capsys.readouterr().err  # 'a dog on the beach' has no {}
    no_trainer = {k: v for k, v in WORKFLOW.items() if k != "2"}
    workflow.write_text(json.dumps(no_trainer))
    prompts.write_text("a {} in the snow")
    assert cli.main(base + ["--train-steps", "3"]) == 2
    assert "no workflow has a node titled param:train_steps, so --train-steps cannot be applied" in capsys.readouterr().err
    assert cli.main(base + ["--concepts", str(tmp_path)]) == 2
    assert f"--concepts: {tmp_path / 'dog.safetensors'} does not exist" in capsys.readouterr().err
    assert cli.main(base[:-2] + ["--workflow", str(tmp_path / "missing.json")]) == 2
    assert "--workflow: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def by_type(prompt: dict) -> dict[str, dict]:
    return {n["class_type"]: n["inputs"] for n in prompt.values()}


def test_every_option_reaches_the_node_it_names(tmp_path):
    """--table1 with every value option: the shipped train.json and table1_metrics.json as the workers get
    them (the expected values are the options given below, and the paper's list for each subject)."""
    subjects = tmp_path / "subjects"
    for subject in ("cat2", "teapot", "dog"):
        (subjects / subject / "masks").mkdir(parents=True)
        for i in range(3):
            (subjects / subject / f"{i:02d}.jpg").write_bytes(f"{subject} photo {i}".encode())
        (subjects / subject / "masks" / "01.png").write_bytes(b"mask")
    classes = tmp_path / "classes.txt"
    classes.write_text("subject_name,class\ncat2,cat\nteapot,teapot\ndog,dog\n")
    options = ["--table1", "--subjects", str(subjects), "--subset", "teapot", "cat2", "--classes", str(classes),
               "--seeds", "3", "5", "--checkpoint", "v1-5.safetensors", "--steps", "7", "--size", "320",
               "--concept", "{subject}_v2.safetensors", "--token", "[{subject}]", "--name", "eq_{subject}",
               "--train-steps", "11", "--train-size", "384", "--train-precision", "fp32", "--class-images", "9",
               "--reference-index", "2", "--no-metrics", "--out", str(tmp_path / "out")]
    jobs, maker, manifest, model_folders, _ = cli.prepare(cli.parse_args(options))
    assert model_folders == {}, "a checkpoint given by name is left to the servers' own folders"
    assert [j["id"] for j in jobs] == ["teapot/train", "cat2/train"] + [
        f"{s}/{p}/all_s{seed}" for s in ("teapot", "cat2") for p in ("unstylized", "stylized") for seed in (3, 5)]

    inputs = cli.Inputs(store=bytes)
    train = maker.request(jobs[1], inputs)
    nodes = by_type(train["prompt"])
    assert nodes["CheckpointLoaderSimple"]["ckpt_name"] == "v1-5.safetensors"
    assert (nodes["EqDiffLoadSubject"]["folder"], nodes["EqDiffLoadSubject"]["size"]) == ("eqdiff_runner/cat2", 384)
    assert nodes["EqDiffTrainerOptions"]["resolution"] == 384
    trainer = nodes["EqDiffFDTETrainer"]
    assert (trainer["class_word"], trainer["name"], trainer["steps"], trainer["precision"]) == ("cat", "eq_cat2", 11, "fp32")
    assert nodes["EqDiffSaveConcept"]["name"] == "eq_cat2" and nodes["EqDiffSaveConcept"]["overwrite"] is True
    assert {k: nodes["EqDiffClassImages"][k] for k in ("class_prompt", "count", "size", "steps")} == {
        "class_prompt": "cat", "count": 9, "size": 384, "steps": 7}
    assert train["concept"] == "eq_cat2.safetensors"
    assert sorted((u["subfolder"], u["name"], u["data"]) for u in train["uploads"]) == [
        ("eqdiff_runner/cat2", f"{i:02d}.jpg", f"cat2 photo {i}".encode()) for i in range(3)] + [
        ("eqdiff_runner/cat2/masks", "01.png", b"mask")]

    # the trained concept is stored under --concept's name and rides along with the subject's samples
    manifest.record(maker.store(jobs[1], {"prompt_id": "p", "seconds": 1.0, "worker": "w", "concept": b"concept bytes"}))
    assert (tmp_path / "out" / "concepts" / "cat2_v2.safetensors").read_bytes() == b"concept bytes"
    inputs.concept("cat2", b"concept bytes", "cat2_v2.safetensors")
    stylized = maker.request(next(j for j in jobs if j["id"] == "cat2/stylized/all_s5"), inputs)
    nodes = by_type(stylized["prompt"])
    assert nodes["EqDiffLoadConcept"]["concept_name"] == "cat2_v2.safetensors"
    assert nodes["EqDiffApplyConcept"]["token"] == "[cat2]"
    assert nodes["LoadImage"]["image"] == "eqdiff_runner/cat2/02.jpg", "--reference-index 2: the third photo"
    assert (nodes["EmptyLatentImage"]["width"], nodes["EmptyLatentImage"]["height"]) == (320, 320)
    assert (nodes["EqDiffEquilibratedSampler"]["seed"], nodes["EqDiffEquilibratedSampler"]["steps"]) == (5, 7)
    assert nodes["CheckpointLoaderSimple"]["ckpt_name"] == "v1-5.safetensors"
    prompt_list = nodes["EqDiffPromptList"]
    assert (prompt_list["list"], prompt_list["subject"]) == ("custom", "[cat2] cat")
    assert prompt_list["custom_prompts"].splitlines() == plan.read_prompts(cli.PAPER_PROMPTS / "prompt_style.txt")
    assert nodes["SaveImage"]["filename_prefix"] == "eqdiff_runner/cat2_stylized_all_s5"
    assert ("eqdiff_concepts", "cat2_v2.safetensors") in {(u["subfolder"], u["name"]) for u in stylized["uploads"]}
    teapot = by_type(maker.request(next(j for j in jobs if j["id"] == "teapot/unstylized/all_s3"), inputs)["prompt"])
    assert teapot["EqDiffPromptList"]["custom_prompts"].splitlines() == plan.read_prompts(
        cli.PAPER_PROMPTS / "prompt_nolive.txt"), "an object gets the nolive list"

    # the run folder now holds a result made with these options: another token is refused there
    with pytest.raises(P.RunnerError, match=r"other settings \(token\)"):
        cli.prepare(cli.parse_args([o if o != "[{subject}]" else "<{subject}>" for o in options]))
