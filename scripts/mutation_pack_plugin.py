"""pytest plugin for mutation testing the ComfyUI boundary (nodes/comfyui/) with tests/comfy; loaded only
by scripts/mutation.sh --boundary (``-p mutation_pack_plugin``), never by the suite itself.

1. Names. mutmut names a mutant after its file (``nodes.comfyui.tokens.x_f__mutmut_3``) and its
   trampoline compares that name with the running function's ``__module__``. tests/comfy load the pack
   the way ComfyUI does, through ``nodes.load_custom_node``, which imports it under a name of its own
   (0.3.75: the folder's path, dots replaced), so the trampolines would neither switch a mutant on nor
   record which tests reach a function. The plugin translates between the two names, in mutmut's
   trampoline module only.
2. Folders. mutmut runs two mutants at once, each in a process of its own; tests that save a concept or
   an image to a fixed name would read each other's files. Each test session gets its own concept,
   embedding, class-image, input, output and temp folders.
3. Memory and disk. Models are unloaded and the session's temporary folder removed after each session.
4. Order. The tests run in the suite's order, and the one that loads the pack in a fresh interpreter is
   left out (below).
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

MUTATED_PACKAGE = "nodes.comfyui."


def pack_module_prefix() -> str | None:
    """``<name>.`` of the pack as the custom-node loader imported it, or None before it is loaded (asked at
    every call of a mutated function; comfy_env.pack_package keeps the name once found)."""
    from comfy_env import pack_package

    package = pack_package()
    return package + "." if package else None


def translate_names() -> None:
    from mutmut.mutation import trampoline

    if getattr(trampoline, "eqdiff_translated", False):  # once per process (mutmut reuses it for runs)
        return
    active_mutant, record_hit = trampoline.get_mutant_under_test, trampoline.record_trampoline_hit

    def get_mutant_under_test() -> str:
        name = active_mutant()
        prefix = pack_module_prefix() if name.startswith(MUTATED_PACKAGE) else None
        return prefix + name if prefix else name

    def strip(name: str | None) -> str | None:
        prefix = pack_module_prefix()
        return name[len(prefix):] if name and prefix and name.startswith(prefix) else name

    def record_trampoline_hit(name: str, caller: str | None = None) -> None:
        record_hit(strip(name), caller=strip(caller))

    trampoline.get_mutant_under_test = get_mutant_under_test
    trampoline.record_trampoline_hit = record_trampoline_hit
    trampoline.eqdiff_translated = True


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config) -> None:
    """Each session also gets a temporary folder of its own, removed when it ends: pytest's numbered
    folders are kept while their lock is held, and a mutant's process ends without releasing it, so
    thousands of sessions filled the disk (24 GB of /tmp/pytest-of-root)."""
    translate_names()
    config.option.basetemp = tempfile.mkdtemp(prefix="eqdiff-mutant-")


def pytest_sessionfinish(session) -> None:
    """mutmut runs the statistics and the clean run in its own process, then forks it for every mutant:
    models left loaded would be copied into every fork (the first full run was killed for memory)."""
    import gc

    import comfy.model_management

    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()
    gc.collect()
    shutil.rmtree(session.config.option.basetemp, ignore_errors=True)


# Runs the pack in a fresh interpreter, where the mutated modules import mutmut itself (a foreign import,
# which the test rightly refuses) and no mutant can be switched on (nothing translates the names there).
IN_ANOTHER_PROCESS = {"tests/comfy/test_registration.py::test_loading_the_pack_imports_nothing_heavy"}


def pytest_collection_modifyitems(config, items) -> None:
    """mutmut names the tests to run from a set, so they would run in any order; they run in the
    suite's (file, then line), the order CI runs them in, since they share session-scoped models."""
    left_out = [item for item in items if item.nodeid in IN_ANOTHER_PROCESS]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
    items[:] = sorted((item for item in items if item.nodeid not in IN_ANOTHER_PROCESS),
                      key=lambda item: (item.location[0], item.location[1]))


# the model folders the pack registers (nodes/comfyui/folders.py), and those of them tests write to
PACK_FOLDERS = ("eqdiff", "eqdiff_class_images", "eqdiff_metrics", "grounding-dino", "sams")
WRITTEN = ("eqdiff", "eqdiff_class_images", "embeddings")


@pytest.fixture(scope="session", autouse=True)
def own_folders(tmp_path_factory):
    """Autouse, so it runs before the pack is loaded (``registered_nodes``). A mutant's process is a fork
    of one that loaded the unmutated pack, so the pack's folders are first taken back to what a fresh
    ComfyUI has (none), or a mutant that registers them wrongly would find them right. The folders tests
    write to start with a path of this process's own; the pack adds ``models/<folder>`` after it and
    writes to a folder's first path."""
    import folder_paths

    # file lists cached by an earlier session of this process name its folders, removed with its basetemp
    folder_paths.filename_list_cache.clear()
    for name in PACK_FOLDERS:
        folder_paths.folder_names_and_paths.pop(name, None)
    for name in WRITTEN:
        _, extensions = folder_paths.folder_names_and_paths.get(name, ([], set()))
        folder_paths.folder_names_and_paths[name] = ([str(tmp_path_factory.mktemp(name))], extensions)
    folder_paths.set_input_directory(str(tmp_path_factory.mktemp("input")))
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("output")))
    folder_paths.set_temp_directory(str(tmp_path_factory.mktemp("temp")))
