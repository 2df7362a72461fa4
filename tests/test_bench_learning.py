"""bench/bench_learning.py's CPU parts: the lr schedule of a stage, the stage list and the vectorised KV encoding."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import bench_learning  # noqa: E402
import kv_dataset_utils  # noqa: E402
from bench_learning import learning_rate_at, parse_stages  # noqa: E402


def test_learning_rate_schedule():
    # warmup: linear from peak / warmup to peak
    assert learning_rate_at(0, 1e-3, 100) == pytest.approx(1e-5)
    assert learning_rate_at(99, 1e-3, 100) == pytest.approx(1e-3)
    # constant after the warmup without decay
    assert learning_rate_at(10_000, 1e-3, 100) == pytest.approx(1e-3)
    # linear decay to min_ratio * peak over decay_steps, then constant
    assert learning_rate_at(100, 1e-3, 100, decay_steps=1000, min_ratio=0.1) == pytest.approx(1e-3)
    assert learning_rate_at(600, 1e-3, 100, decay_steps=1000, min_ratio=0.1) == pytest.approx(0.55e-3)
    assert learning_rate_at(1100, 1e-3, 100, decay_steps=1000, min_ratio=0.1) == pytest.approx(1e-4)
    assert learning_rate_at(5000, 1e-3, 100, decay_steps=1000, min_ratio=0.1) == pytest.approx(1e-4)
    # no warmup
    assert learning_rate_at(0, 5e-4, 0) == pytest.approx(5e-4)


def test_parse_stages():
    assert parse_stages(["8:0.9", "16"], 0.95) == [(8, 0.9), (16, 0.95)]


def test_vectorised_encoding_equals_the_trainer_collator():
    tokenizer = kv_dataset_utils.load_kv_tokenizer(62)
    stream = bench_learning.KVStream(16, tokenizer, seed=0, stream=kv_dataset_utils.TRAIN_STREAM, batch_size=4)
    bench_learning.check_against_collator(stream)  # raises if any tensor differs
    batch = stream.take(4)
    assert batch["context_input_ids"].shape == (4, 120) and batch["query_input_ids"].shape == (4, 16)


def test_bad_schedule_arguments_are_rejected(capsys):
    with pytest.raises(SystemExit):
        bench_learning.main(["--stage_decay_steps", "-1"])
    assert "--stage_decay_steps >= 0" in capsys.readouterr().err


def test_compare_learning_table_and_plot(tmp_path):
    import json

    import compare_learning

    def record(stage, n, step, wall, em, loss):
        return {"stage": stage, "N": n, "step": step, "wall_s": wall, "exact_match": em, "loss": loss,
                "skipped_steps": 0}

    reached = [record(0, 8, 100, 10.0, 0.5, 1.0), record(0, 8, 200, 20.0, 0.91, 0.5),
               record(1, 16, 100, 30.0, 0.6, 0.9), record(1, 16, 200, 40.0, 0.96, 0.2),
               record(1, 16, 300, 50.0, 0.97, 0.1)]
    cut = reached[:3] + [record(1, 16, 200, 40.0, 0.0, 9.7)]
    paths = []
    for name, records in (("reached", reached), ("cut", cut)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(f"{name} run={path}")
    notes = tmp_path / "notes.md"
    notes.write_text("Some context.")
    compare_learning.main([*paths, "--out_prefix", str(tmp_path / "cmp"), "--notes_file", str(notes)])
    text = (tmp_path / "cmp.md").read_text()
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| reached") or
            line.startswith("| cut")}
    # first stage ends at 20 s; N16 first >= 0.95 at 40 s after 200 N16 steps; best 0.97 at 50 s
    assert rows["| reached run"].startswith("| reached run | 20, 200, 0.910 | **40 s** (200) | 0.970 (50) | 0.90 |")
    assert "not reached" in rows["| cut run"] and "| 9.70 |" in rows["| cut run"]
    assert "Some context." in text and (tmp_path / "cmp.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        compare_learning.main(["no-label-here", "--out_prefix", str(tmp_path / "x")])
