"""Every notebook under notebooks/ runs against today's code (the reference's notebooks had rotted).

Contract for a notebook (so that it can be added here without touching this test):
- valid nbformat 4 JSON;
- its first code cell defines the size constants and reads GRADMEM_NOTEBOOK_TINY: when it is "1", sizes are tiny
  (the whole notebook runs in at most ~30 s on a 2-core CPU);
- it writes files only under GRADMEM_NOTEBOOK_OUT_DIR when that variable is set;
- plain Python cells: no shell escapes (`!cmd`); line magics (`%matplotlib inline`) are skipped here;
- it is committed with the outputs of one real run, top to bottom, without errors (at its full, non-tiny sizes,
  small enough for a CPU).
The code cells are executed in order in one namespace, with notebooks/ as the working directory.
"""
import json
import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# what a notebook must leave under GRADMEM_NOTEBOOK_OUT_DIR (glob patterns)
EXPECTED_OUTPUTS = {
    "dump_dataset.ipynb": ["*/dataset_dict.json", "*/kv_task.json"],
    "collect_results.ipynb": ["summary/summary.md", "summary/*.png"],
    "memory_write_read.ipynb": ["memory.pt", "memory_write_read/trainer_state.json", "data/*/dataset_dict.json"],
}


def load_notebook(path: Path) -> dict:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4, f"{path.name}: not an nbformat 4 notebook"
    assert isinstance(nb.get("metadata"), dict) and isinstance(nb.get("cells"), list)
    for cell in nb["cells"]:
        assert cell["cell_type"] in ("code", "markdown", "raw")
        assert isinstance(cell["source"], (str, list)) and isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert "outputs" in cell and "execution_count" in cell
    return nb


def cell_source(cell: dict) -> str:
    return cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])


def as_plain_python(source: str, where: str) -> str:
    lines = []
    for line in source.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("!"):
            raise AssertionError(f"{where}: shell escape {stripped!r}; notebooks must be plain Python")
        lines.append("pass  # " + stripped if stripped.startswith("%") else line)
    return "\n".join(lines)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


def run_notebook(path: Path, out_dir: Path, monkeypatch) -> dict:
    """Executes the code cells of a notebook on tiny sizes; returns the namespace."""
    nb = load_notebook(path)
    code_cells = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code_cells, f"{path.name} has no code"
    assert "GRADMEM_NOTEBOOK_TINY" in cell_source(code_cells[0]), \
        f"{path.name}: the first code cell must define its sizes and read GRADMEM_NOTEBOOK_TINY"

    monkeypatch.setenv("GRADMEM_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("GRADMEM_NOTEBOOK_OUT_DIR", str(out_dir))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(path.parent)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a notebook may extend sys.path
    namespace = {"__name__": "__main__", "display": print}
    for i, cell in enumerate(code_cells):
        where = f"{path.name}, code cell {i}"
        exec(compile(as_plain_python(cell_source(cell), where), where, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_on_tiny_sizes(path, tmp_path, monkeypatch):
    run_notebook(path, tmp_path, monkeypatch)
    for pattern in EXPECTED_OUTPUTS.get(path.name, []):
        assert list(tmp_path.glob(pattern)), f"{path.name} wrote no {pattern} under GRADMEM_NOTEBOOK_OUT_DIR"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_holds_the_outputs_of_one_run(path):
    code_cells = [cell for cell in load_notebook(path)["cells"] if cell["cell_type"] == "code"]
    assert [cell["execution_count"] for cell in code_cells] == list(range(1, len(code_cells) + 1)), \
        f"{path.name}: commit it executed once, top to bottom"
    outputs = [output for cell in code_cells for output in cell["outputs"]]
    assert outputs, f"{path.name} holds no output"
    assert not [output for output in outputs if output["output_type"] == "error"], f"{path.name} stored an error"


def test_collect_results_after_the_quickstart(tmp_path, monkeypatch):
    """The quickstart leaves runs/quickstart (no <task>/<run_name>/run_<seed> folders): the notebook collects the
    committed results instead of failing."""
    quickstart = tmp_path / "runs" / "quickstart"
    quickstart.mkdir(parents=True)
    for name, content in (("all_results.json", {"eval_exact_match": 0.9}), ("run_config.json", {"cli_args": {}}),
                          ("trainer_state.json", {"log_history": []})):
        (quickstart / name).write_text(json.dumps(content))
    namespace = run_notebook(NOTEBOOK_DIR / "collect_results.ipynb", tmp_path, monkeypatch)
    assert namespace["RUNS_DIR"] == namespace["COMMITTED_RUNS_DIR"]
    assert (tmp_path / "summary" / "summary.md").is_file()
