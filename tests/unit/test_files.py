"""eqdiff_core.files.write_atomic: the temporary file, the permissions, bytes and text, failures."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from eqdiff_core.files import write_atomic


def test_bytes_and_text_are_written_as_given(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    assert write_atomic(path, b"\x00\xff\n") == str(path)
    assert path.read_bytes() == b"\x00\xff\n"
    write_atomic(path, "café\r\n")  # text: UTF-8, line ends kept
    assert path.read_bytes() == b"caf\xc3\xa9\r\n" and os.listdir(tmp_path / "sub") == ["a.bin"]


def test_the_file_gets_the_umasks_permissions(tmp_path):
    """As open() makes a file: 0o666 less the umask (0o022 here: rw-r--r--), never executable; also when a
    writer function makes the file with its own mode (safetensors' save_file: 0o600, so a concept saved by
    one user of a shared ComfyUI would be unreadable to the others)."""
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "x")
        write_atomic(tmp_path / "b.safetensors", lambda tmp: save_file({"a": torch.ones(1)}, tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "b.safetensors").st_mode) == 0o644


def test_the_temporary_file_is_in_the_target_folder_and_removed_on_failure(tmp_path, monkeypatch):
    """The module's promise: a temporary file in the same folder (so the rename stays on one file system),
    and nothing left behind when writing fails; the writer's own error comes out."""
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    given = []

    def failing_writer(tmp):
        given.append(tmp)
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="^disk full$"):
        write_atomic(tmp_path / "out" / "c.safetensors", failing_writer)
    assert os.path.dirname(given[0]) == str(tmp_path / "out") and given[0].endswith(".safetensors")
    assert os.listdir(tmp_path / "out") == [] and os.listdir(elsewhere) == []
