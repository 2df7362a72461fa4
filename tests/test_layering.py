"""The layering of the code: the shared trainer (training*.py) and the captured step (fast_step.py) know no model, no
task and no run script (nor the answer tasks' run wiring, answer_task_runs.py); tools (bench/, scripts/) never import
a run script; nothing imports the modules that the trainer's split removed. Imports are read with ast (the Python
embedded in the shell presets with a line scan), so nothing is imported here."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAINER_MODULES = sorted([p.name for p in REPO.glob("training*.py")] + ["fast_step.py"])
MODEL_FILES = {"grad_memgpt", "rmt", "full_context_lm"}
TASK_FILES = {"kv_dataset_utils", "squad_utils", "phonebook_utils", "babi_utils", "babi_generator", "answer_tasks",
              "prepare_pg19_chunks", "sentence_split", "curriculum"}
RUN_SCRIPTS = {p.stem for p in REPO.glob("run_*.py")} | {"answer_task_runs"}  # the run scripts and their wiring
REMOVED_MODULES = {"training", "baselines"}  # split into training_*.py; baselines' parts live in rmt, full_context_lm
SHELL_IMPORT = re.compile(r"(?:^|[\s;\"'])(?:from\s+([\w.]+)\s+import\b|import\s+([^\n;\"']+))", re.M)


def python_imports(source: str) -> set:
    """Top-level names of every module a Python source imports (at any depth: functions' local imports too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def shell_imports(source: str) -> set:
    """Top-level names of the modules that the Python embedded in a shell script imports (`from x import`,
    `import x, y`)."""
    names = set()
    for found_from, found_import in SHELL_IMPORT.findall(source):
        for part in ([found_from] if found_from else found_import.split(",")):
            if part.split():
                names.add(part.split()[0].split(".")[0])  # `import x.y as z` -> x
    return names


def test_the_lists_name_existing_files():
    assert {"training_args.py", "training_experiment.py", "training_loop.py", "fast_step.py"} <= set(TRAINER_MODULES)
    for stem in MODEL_FILES | TASK_FILES:
        assert (REPO / f"{stem}.py").is_file(), stem
    assert "run_gradmemgpt_on_kv_retrieval" in RUN_SCRIPTS and "run_rmt_on_kv_retrieval" in RUN_SCRIPTS
    for stem in RUN_SCRIPTS:
        assert (REPO / f"{stem}.py").is_file(), stem
    for stem in REMOVED_MODULES:
        assert not (REPO / f"{stem}.py").exists(), stem


@pytest.mark.parametrize("module", TRAINER_MODULES)
def test_trainer_imports_no_model_task_or_run_script(module):
    imported = python_imports((REPO / module).read_text())
    assert not imported & MODEL_FILES, f"{module} imports the model file(s) {sorted(imported & MODEL_FILES)}"
    assert not imported & TASK_FILES, f"{module} imports the task file(s) {sorted(imported & TASK_FILES)}"
    assert not imported & RUN_SCRIPTS, f"{module} imports the run script(s) {sorted(imported & RUN_SCRIPTS)}"


def test_tools_import_no_run_script():
    tools = sorted([*REPO.glob("bench/**/*.py"), *REPO.glob("scripts/**/*.py"), *REPO.glob("scripts/**/*.sh"),
                    *REPO.glob("bench/**/*.sh")])
    assert any(p.suffix == ".sh" for p in tools) and any(p.suffix == ".py" for p in tools)
    for path in tools:
        source = path.read_text()
        imported = python_imports(source) if path.suffix == ".py" else shell_imports(source)
        assert not imported & RUN_SCRIPTS, f"{path.relative_to(REPO)} imports {sorted(imported & RUN_SCRIPTS)}"


def test_nothing_imports_a_removed_module():
    sources = sorted([*REPO.glob("*.py"), *REPO.glob("bench/**/*.py"), *REPO.glob("scripts/**/*.py"),
                      *REPO.glob("tests/**/*.py"), *REPO.glob("scripts/**/*.sh"), *REPO.glob("bench/**/*.sh")])
    for path in sources:
        source = path.read_text()
        imported = python_imports(source) if path.suffix == ".py" else shell_imports(source)
        assert not imported & REMOVED_MODULES, f"{path.relative_to(REPO)} imports {sorted(imported & REMOVED_MODULES)}"


def test_the_checks_catch_imports():
    assert python_imports("def f():\n    from run_rmt_on_kv_retrieval import RMTArgs\n") == {"run_rmt_on_kv_retrieval"}
    assert python_imports("import grad_memgpt.sub as g, os\n") == {"grad_memgpt", "os"}
    script = ("CODE='\nimport shlex, run_gpt2_on_kv_retrieval as lm, json\nfrom rmt import RMTArgs\n'\n"
              '"$PYTHON" -c "import sys; import run_rmt_on_kv_retrieval"\n')
    assert shell_imports(script) == {"shlex", "run_gpt2_on_kv_retrieval", "json", "rmt", "sys",
                                     "run_rmt_on_kv_retrieval"}
