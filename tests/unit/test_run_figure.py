"""scripts/run_figure.py's workflow parameters without a server: training parameters, Prompt List jobs,
output labels and the errors that stop a run before any job."""

import json

import pytest

import run_figure as R

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
    "5": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}, "_meta": {"title": "param:output Save A"}},
    "6": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b"}, "_meta": {"title": "param:output Save A"}},
}


def test_training_parameters_and_the_prompt_list_are_filled(tmp_path):
    params = R.find_params(WORKFLOW)
    assert params["train_steps"] == ["2"] and params["subject"] == ["1"] and R.uses_prompt_list(WORKFLOW, params)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {} in the snow\r\n\r\n{} on the beach \r\n")
    (job,) = R.plan_jobs(["cat2"], {"cat2": "cat"}, [prompts], [7], "<{subject}>", prompt_list=True)
    assert job["id"] == "cat2/p/all_s7" and job["prompts"] == ["a <cat2> cat in the snow", "<cat2> cat on the beach"]
    filled = R.fill(WORKFLOW, params, {"subject": "eqdiff_runner/cat2", "class_word": "cat", "name": "cat2",
                                       "train_steps": 5, "steps": 2, "seed": 7, "prompt": job["prompt"]})
    R.fill_prompt_list(filled, params, job["lines"], job["phrase"])
    assert filled["1"]["inputs"]["folder"] == "eqdiff_runner/cat2"
    assert filled["2"]["inputs"] == {"class_word": "cat", "name": "cat2", "steps": 5}  # train_steps, not steps
    assert filled["4"]["inputs"] == {"seed": 7, "steps": 2}
    assert filled["3"]["inputs"] == {"list": "custom", "subject": "<cat2> cat", "first_index": 0, "count": 0,
                                     "custom_prompts": "a {} in the snow\n{} on the beach", "images_per_prompt": 1}
    assert WORKFLOW["2"]["inputs"]["steps"] == 600, "the workflow itself is not changed"
    assert R.output_names(WORKFLOW, params) == {"5": "Save_A", "6": "Save_A_6"}


def test_plain_jobs_carry_the_class_word(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {} in the snow\nwatercolor of a {}")
    jobs = R.plan_jobs(["dog"], {"dog": "dog"}, [prompts], [0, 1], "<{subject}>")
    assert [j["id"] for j in jobs] == ["dog/p/000_s0", "dog/p/000_s1", "dog/p/001_s0", "dog/p/001_s1"]
    assert {j["class_word"] for j in jobs} == {"dog"} and jobs[2]["prompt"] == "watercolor of a <dog> dog"


@pytest.mark.parametrize("change,message", [
    (lambda w: w["3"]["_meta"].update(title="Prompts"), "a workflow with a Prompt List must title it"),
    (lambda w: w["3"]["_meta"].update(title="param:prompt,seed Prompts"), "a Prompt List can only be param:prompt"),
    (lambda w: w["2"]["_meta"].update(title="param:subject Trainer"), "has none of the inputs folder"),
])
def test_bad_titles_are_refused(change, message):
    workflow = json.loads(json.dumps(WORKFLOW))
    change(workflow)
    with pytest.raises(R.RunnerError, match=message):
        R.find_params(workflow)


def test_options_for_missing_parameters_and_lines_without_placeholder_stop_the_run(tmp_path, capsys):
    subjects = tmp_path / "subjects"
    (subjects / "dog").mkdir(parents=True)
    (subjects / "dog" / "00.jpg").write_bytes(b"")
    (subjects / "prompts_and_classes.txt").write_text("dog,dog\n")
    workflow = tmp_path / "w.json"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {} in the snow\na dog on the beach")
    base = ["--server", "http://127.0.0.1:9", "--subjects", str(subjects), "--prompts", str(prompts),
            "--no-metrics", "--out", str(tmp_path / "out"), "--workflow", str(workflow)]
    workflow.write_text(json.dumps(WORKFLOW))
    assert R.main(base) == 2
    assert "--prompts: " in capsys.readouterr().err  # 'a dog on the beach' has no {}
    no_trainer = {k: v for k, v in WORKFLOW.items() if k != "2"}
    workflow.write_text(json.dumps(no_trainer))
    prompts.write_text("a {} in the snow")
    assert R.main(base + ["--train-steps", "3"]) == 2
    assert "no node titled param:train_steps, so --train-steps cannot be applied" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
