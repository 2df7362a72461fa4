"""bench/bench_step.py on the CPU: its rows parse (lean ops as an optional fourth field) and its paper model takes
the lean_ops option (the timings need a GPU and are not tested)."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_step import DEFAULT_ROWS, LONG_ROWS, paper_kv_model, parse_row  # noqa: E402


def test_rows_parse_with_lean_ops_as_a_fourth_field():
    assert parse_row("graph:fused_double_bwd:bf16") == ("graph", "fused_double_bwd", "bf16", False)
    assert parse_row("graph:fused_double_bwd:bf16:lean") == ("graph", "fused_double_bwd", "bf16", True)
    lean_rows = [parse_row(row) for row in DEFAULT_ROWS + LONG_ROWS if parse_row(row)[3]]
    assert {precision for _, _, precision, _ in lean_rows} == {"fp32", "tf32", "bf16"}
    for bad in ("graph:eager", "graph:eager:fp64", "graph:eager:fp32:fast", "fast:eager:fp32"):
        with pytest.raises(SystemExit, match="bad row"):
            parse_row(bad)


def test_paper_model_with_lean_ops():
    model = paper_kv_model("exact_eager", device="cpu", lean_ops=True)
    assert model.config.lean_ops
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == 4 + 4 * 2 + 1  # the MLPs, two norms per layer, the final norm
