"""bench/kv_capacity_report.py: wall time summed over sittings, unfinished stages marked, the guards' counters shown."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import kv_capacity_report  # noqa: E402


def stage(folder, exact_match, step, test, **extra):
    folder.mkdir(parents=True)
    (folder / "all_results.json").write_text(json.dumps({
        "eval_exact_match": exact_match, "global_step": step, "test_generated_exact_match": test, **extra}))
    history = [{"step": s, "eval_exact_match": exact_match * s / step} for s in range(0, step + 1, 100)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_summary_sums_sittings_and_marks_unfinished(tmp_path):
    seed = tmp_path / "seed_1"
    stage(seed / "N8", 0.96, 700, 0.955)
    stage(seed / "N16", 0.90, 3000, 0.89, spike_skipped_steps=4, rollbacks=1, final_test_generated_exact_match=0.88)
    record = {"invocations": [
        {"stages": [{"stage": "N8", "threshold": 0.95, "end_s": 70.0}, {"stage": "N16", "threshold": 0.95, "end_s": 400.0}]},
        {"stages": [{"stage": "N16", "threshold": 0.95, "end_s": 300.0}]}]}
    (seed / "curriculum.json").write_text(json.dumps(record))
    rows = kv_capacity_report.stage_rows(seed)
    assert [(r["stage"], r["wall_s"], r["done"]) for r in rows] == [("N8", 70.0, True), ("N16", 700.0, False)]
    text = kv_capacity_report.summary(tmp_path)
    assert "| 1 | N8 | yes (0.95) | 700 | 70 s | 0.9600 | 0.9550 |  | 0 | 0 |" in text
    assert "| 1 | N16 | **no (unfinished)** (0.95) | 3000 | 700 s | 0.9000 | 0.8900 | 0.8800 | 4 | 1 |" in text
    kv_capacity_report.main([str(tmp_path)])
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "curves.png").stat().st_size > 0
