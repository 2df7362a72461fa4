"""bench/kv_capacity_report.py: wall time summed over sittings; unfinished, budget-spent and collapsed stages marked;
the guards' counters shown; continuations and variants listed after their seed; a folder without runs refused."""
import json
import sys

import pytest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import kv_capacity_report  # noqa: E402


def stage(folder, exact_match, step, test, cli_args=None, **extra):
    folder.mkdir(parents=True)
    (folder / "run_config.json").write_text(json.dumps({"cli_args": {"K": 2, "inner_lr": 0.04, "max_steps": 36000,
                                                                     **(cli_args or {})}}))
    (folder / "all_results.json").write_text(json.dumps({
        "eval_exact_match": exact_match, "global_step": step, "test_generated_exact_match": test, **extra}))
    history = [{"step": s, "eval_exact_match": exact_match * s / step} for s in range(0, step + 1, 100)]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_summary_sums_sittings_and_marks_unfinished(tmp_path):
    seed = tmp_path / "seed_1"
    stage(seed / "N8", 0.96, 700, 0.955)
    stage(seed / "N16", 0.90, 3000, 0.89, spike_skipped_steps=4, rollbacks=1, final_test_generated_exact_match=0.88)
    record = {"invocations": [
        {"stages": [{"stage": "N8", "threshold": 0.95, "end_s": 70.0, "final_evaluation_wall_s": 2.0},
                    {"stage": "N16", "threshold": 0.95, "end_s": 400.0, "final_evaluation_wall_s": 3.0}]},
        {"stages": [{"stage": "N16", "threshold": 0.95, "end_s": 300.0, "final_evaluation_wall_s": 4.0}]}]}
    (seed / "curriculum.json").write_text(json.dumps(record))
    rows = kv_capacity_report.stage_rows(seed)
    assert [(r["stage"], r["wall_s"], r["done"]) for r in rows] == [("N8", 70.0, True), ("N16", 700.0, False)]
    # less the final evaluations up to the stage's last sitting: N8 its own, N16 N8's and its two
    assert [r["wall_s_without_tests"] for r in rows] == [68.0, 691.0]
    later = tmp_path / "seed_1_k5"  # a continuation of seed 1 with another recipe
    stage(later / "N16", 0.91, 1100, 0.90, cli_args={"K": 5, "inner_lr": 0.08, "max_rollbacks": 3}, rollbacks=3)
    stage(later / "N32", 0.50, 36000, 0.49, cli_args={"eval_K": 5})
    (later / "curriculum.json").write_text(json.dumps({"invocations": [{"started": "2026-11-30 13:00:00", "stages": [
        {"stage": "N16", "threshold": 0.95, "end_s": 50.0}, {"stage": "N32", "threshold": 0.95, "end_s": 90.0}]}]}))
    text = kv_capacity_report.summary(tmp_path)
    assert "| seed_1 | N8 | 2 / 0.04 | yes (0.95) | 700 | 70 s | 68 s | 0.9600 | 0.9550 |  | 0 | 0 |" in text
    assert ("| seed_1 | N16 | 2 / 0.04 | **no (unfinished)** (0.95) | 3000 | 700 s | 691 s | 0.9000 | 0.8900 | 0.8800 "
            "| 4 | 1 |") in text
    assert "| seed_1_k5 | N16 | 5 / 0.08 | **no: collapsed 3 times, stopped** (0.95) | 1100 | 50 s | - |" in text
    assert "| seed_1_k5 | N32 | 2 / 0.04 (evaluated 5 / 0.04) | **no: step budget (36000) spent** (0.95) | 36000 | 90 s | - |" in text
    assert text.index("| seed_1 | N16") < text.index("| seed_1_k5 |")
    kv_capacity_report.main([str(tmp_path)])
    assert (tmp_path / "summary.md").is_file() and (tmp_path / "curves.png").stat().st_size > 0


def test_a_warm_up_stage_without_test_numbers_is_marked(tmp_path):
    seed = tmp_path / "seed_1"
    stage(seed / "N2", 0.96, 700, None)  # --final_evaluation false: no test numbers
    (seed / "curriculum.json").write_text(json.dumps({"invocations": [
        {"stages": [{"stage": "N2", "threshold": 0.95, "end_s": 13.0, "final_evaluation_wall_s": 0.0}]}]}))
    assert ("| seed_1 | N2 | 2 / 0.04 | yes (0.95) | 700 | 13 s | 13 s | 0.9600 | - (warm-up stage: not evaluated) |"
            in kv_capacity_report.summary(tmp_path))


def test_variants_are_grouped_by_the_seed_of_their_record(tmp_path):
    for name, seed, started in (("w300_seed_2", 2, "12:00"), ("w100_seed_1", 1, "12:05"), ("w300_seed_1", 1, "12:00")):
        stage(tmp_path / name / "N8", 0.95, 600, 0.95)
        (tmp_path / name / "curriculum.json").write_text(json.dumps({"invocations": [
            {"started": started, "argv": ["--seed", str(seed)], "stages": [
                {"stage": "N8", "threshold": 0.95, "end_s": 40.0}]}]}))
    assert [p.name for p in kv_capacity_report.run_folders(tmp_path)] == ["w300_seed_1", "w100_seed_1", "w300_seed_2"]


def test_a_folder_without_runs_is_refused_before_anything_is_written(tmp_path, capsys):
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(SystemExit):
        kv_capacity_report.main([str(tmp_path)])
    assert "holds no run folder" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()


def test_a_later_sitting_that_collapsed_keeps_the_earlier_selection_and_is_marked(tmp_path):
    seed = tmp_path / "seed_1_n96"
    stage(seed / "N96", 0.01, 3000, 0.02)  # the newest sitting: it selected nothing better, its final collapsed
    sittings = ((0.70, 0.69), (0.76, 0.72), (0.01, 0.02))  # (valid, test) each sitting selected
    record = {"invocations": [{"stages": [{"stage": "N96", "threshold": 0.9, "end_s": 100.0, "eval_exact_match": e,
                                           "test_generated_exact_match": t}]} for e, t in sittings]}
    (seed / "curriculum.json").write_text(json.dumps(record))
    (row,) = kv_capacity_report.stage_rows(seed)
    assert (row["valid"], row["test"], row["final_test"], row["done"]) == (0.76, 0.72, 0.02, False)
    assert ("| seed_1_n96 | N96 | 2 / 0.04 | **no: collapsed (final checkpoint: valid 0.0100)** (0.9) | 3000 | 300 s | - "
            "| 0.7600 | 0.7200 | 0.0200 |") in kv_capacity_report.summary(tmp_path)
