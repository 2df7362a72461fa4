"""bench/finished_weights.py: the selected weights of the runs finished after the marker, and no more than the cap."""
import json
import os

import pytest

from bench import finished_weights as fw


def finished_run(root, name, mtime, weights_bytes=None):
    """A run folder whose all_results.json (written at mtime) names its selected checkpoint, with weights if given."""
    run = root / name / "run_143"
    best = run / "checkpoint-500"
    best.mkdir(parents=True)
    if weights_bytes is not None:
        (best / "model.safetensors").write_bytes(b"\0" * weights_bytes)
    results = run / "all_results.json"
    results.write_text(json.dumps({"best_model_checkpoint": str(best)}))
    os.utime(results, (mtime, mtime))
    return best / "model.safetensors"


def test_runs_finished_after_the_marker_up_to_the_cap(tmp_path, capsys):
    marker = tmp_path / "start"
    marker.touch()
    start = marker.stat().st_mtime
    mb = 2**20
    before = finished_run(tmp_path, "a_before", start - 10, mb)
    first = finished_run(tmp_path, "b_first", start + 10, 2 * mb)
    finished_run(tmp_path, "c_no_weights", start + 10)
    too_much = finished_run(tmp_path, "d_too_much", start + 10, 2 * mb)
    fourth = finished_run(tmp_path, "e_fits", start + 10, mb // 2)
    kept, left_out = fw.finished_weights(tmp_path, start, max_mb=3)
    assert kept == [first, fourth] and left_out == [too_much] and before not in kept
    fw.main([str(tmp_path), str(marker), "--max_mb", "3"])
    out, err = capsys.readouterr()
    assert out.split() == [str(first), str(fourth)] and f"{too_much} left out (--max_mb 3 reached)" in err


def test_a_missing_marker_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fw.main([str(tmp_path), str(tmp_path / "nowhere")])
    assert "touch it before the runs start" in capsys.readouterr().err
