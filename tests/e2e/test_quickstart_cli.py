"""scripts/quickstart.py's main() as a user runs it: its own server, a checkpoint from a folder of the
user's (given with --checkpoint, reached through extra_model_paths), the outputs it prints."""

import json
import os
import shutil
import subprocess

from PIL import Image

from comfy_env import ENV, REPO, TINY_CHECKPOINT

QUICKSTART = REPO / "scripts" / "quickstart.py"
# the checkpoint's VAE decoding an empty 8x8 latent: a 64x64 image only if the checkpoint was found
DECODE_ONLY = {
    "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "set by quickstart"}},
    "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "quickstart_cli"}},
}


def quickstart(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EQDIFF_ENV": str(ENV)}
    return subprocess.run([str(ENV / "venv" / "bin" / "python"), str(QUICKSTART), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_a_checkpoint_from_the_users_folder_runs_and_the_outputs_are_listed(tmp_path):
    folder = tmp_path / "my models"
    folder.mkdir()
    shutil.copy(TINY_CHECKPOINT, folder / "my_sd15.safetensors")
    workflow = tmp_path / "decode.json"
    workflow.write_text(json.dumps(DECODE_ONLY))
    done = quickstart("--checkpoint", str(folder / "my_sd15.safetensors"), "--workflow", str(workflow),
                      "--out", str(tmp_path / "run"), "--cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    listed = [line.strip() for line in done.stdout.splitlines() if line.startswith("  ")]
    assert len(listed) == 1 and listed[0].endswith(".png"), done.stdout
    assert Image.open(listed[0]).size == (64, 64)
    assert str(tmp_path / "run") in listed[0], "the outputs go to --out"


def test_a_file_that_is_no_checkpoint_is_refused_before_a_server_starts(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    done = quickstart("--checkpoint", str(notes), "--out", str(tmp_path / "run"))
    assert done.returncode == 2
    assert f"--checkpoint: {notes} is not a checkpoint file" in done.stderr
    assert not (tmp_path / "run").exists()
