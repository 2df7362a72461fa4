"""bench/extrapolate_curve.py: the log-step fit recovers a curve of that shape exactly, keeps the first evaluation of a
step evaluated twice, says 'never' for a curve that does not rise, compares later evaluations (up to a step) with the
prediction, and refuses input it cannot fit."""
import json
import math

import pytest

from bench import extrapolate_curve as ec


def write_run(path, points):
    path.mkdir(parents=True)
    history = [{"step": step, "loss": 1.0} for step, _ in points]
    history += [{"step": step, "eval_exact_match": em} for step, em in points]
    (path / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return path


def test_a_log_linear_curve_is_recovered_and_extrapolated(tmp_path):
    a, b = 0.1, 0.05
    points = [(step, a + b * math.log(step)) for step in range(500, 10001, 500)]
    points.append((10000, 0.0))  # the selected checkpoint evaluated again at the last step: left out
    run = write_run(tmp_path / "run", points)
    assert ec.evaluations(run)[-1] == (10000, pytest.approx(a + b * math.log(10000)))
    fit_a, fit_b, rms = ec.log_fit(ec.evaluations(run))
    assert (fit_a, fit_b, rms) == (pytest.approx(a), pytest.approx(b), pytest.approx(0, abs=1e-12))
    assert ec.step_reaching(fit_a, fit_b, 0.9) == pytest.approx(math.exp((0.9 - a) / b))
    table = ec.report([run], 0.9, 1000, [20000])
    row = table.splitlines()[2]
    assert f"{math.exp(16):,.0f}" in row and f"{a + b * math.log(20000):.3f}" in row and "19 (1,000-10,000)" in row


def test_a_curve_that_does_not_rise_never_reaches(tmp_path):
    run = write_run(tmp_path / "flat", [(1000, 0.5), (2000, 0.5), (4000, 0.49)])
    assert "| never |" in ec.report([run], 0.9, 1000, [])


def test_too_few_evaluations_and_a_missing_record_are_named(tmp_path, capsys):
    run = write_run(tmp_path / "short", [(500, 0.1), (1000, 0.2)])
    with pytest.raises(SystemExit):
        ec.main([str(run), "--from_step", "1000"])
    assert "two or more steps; got 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ec.main([str(tmp_path)])
    assert "no trainer_state.json" in capsys.readouterr().err


def test_fit_until_compares_the_later_evaluations_with_the_prediction(tmp_path):
    a, b = 0.1, 0.05
    points = [(step, a + b * math.log(step)) for step in range(1000, 10001, 1000)]
    points[-1] = (10000, points[-1][1] + 0.1)  # the last evaluation 0.1 above the curve: mean difference 0.1 / 5
    run = write_run(tmp_path / "run", points)
    row = ec.report([run], 0.9, 1000, [], fit_until=5000).splitlines()[2]
    assert "| 5 (1,000-5,000) |" in row and "| 5 (6,000-10,000) |" in row and row.endswith("| +0.020 |")
    assert ec.report([run], 0.9, 1000, [], fit_until=10000).splitlines()[2].endswith("| none | - | - | - | - |")
    # up to --compare_until only: the step-10,000 evaluation above the curve is left out, the rest lie on it
    window = ec.report([run], 0.9, 1000, [], fit_until=5000, compare_until=9000).splitlines()[2]
    median = a + b * (math.log(7000) + math.log(8000)) / 2  # of the four evaluations at 6,000-9,000
    assert "| 4 (6,000-9,000) |" in window and f"| {median:.3f} |" in window and window.endswith("| +0.000 |")
    with pytest.raises(SystemExit):
        ec.main([str(run), "--compare_until", "9000"])
