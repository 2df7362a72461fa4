"""bench/capacity_sitting.sh: a jobs file's jobs run through scripts/run_kv_capacity.sh, one after the other on each
GPU and the GPUs side by side; the metrics of every job are packed; a bad jobs file is refused before anything runs."""
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Stands in for python3: records each curriculum call (GPU, arguments, start and end time) and writes a curriculum.json;
# other calls (-c, -m) go to the real interpreter.
STUB = """#!{python}
import json, os, sys, time
if sys.argv[1] in ("-c", "-m"):
    os.execv(sys.executable, [sys.executable] + sys.argv[1:])
args = sys.argv[2:]
out = args[args.index("--out_dir") + 1]
os.makedirs(out, exist_ok=True)
start = time.time()
time.sleep(0.5)
with open(os.environ["CALLS"], "a") as f:
    f.write(json.dumps({{"gpu": os.environ["CUDA_VISIBLE_DEVICES"], "out": out, "args": args, "start": start,
                        "end": time.time()}}) + "\\n")
stage = {{"stage": "N2", "global_step": 7, "end_s": 1.5, "eval_exact_match": 0.96}}
json.dump({{"invocations": [{{"stages": [stage]}}]}}, open(os.path.join(out, "curriculum.json"), "w"))
"""


def run_sitting(tmp_path, jobs: str, **extra_env):
    stub = tmp_path / "python_stub"
    stub.write_text(STUB.format(python=os.sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "sitting.jobs").write_text(jobs)
    env = {**os.environ, "JOBS": str(tmp_path / "sitting.jobs"), "OUT": str(tmp_path / "out"), "PYTHON": str(stub),
           "CALLS": str(tmp_path / "calls.jsonl"), **extra_env}
    return subprocess.run(["bash", str(REPO / "bench" / "capacity_sitting.sh")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_jobs_queue_per_gpu_and_metrics_are_packed(tmp_path):
    a, b, c = (tmp_path / "runs" / name for name in ("a", "b", "c"))
    jobs = (f"# first GPU: one long job\n"
            f"0 8 SEED=1 OUT_DIR={a} STAGES=\"96:0.90:K=5,inner_lr=0.12\"\n"
            f"1 2.5 SEED=2 OUT_DIR={b} STAGES=\"2:0.95 4:0.95\" -- --warmup_steps 100\n"
            f"1 2.5 SEED=3 OUT_DIR={c} STAGES=\"2:0.95 4:0.95\"\n")
    done = run_sitting(tmp_path, jobs)
    assert done.returncode == 0, done.stderr
    calls = {Path(c["out"]).name: c for c in map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())}
    assert set(calls) == {"a", "b", "c"}
    assert [calls[k]["gpu"] for k in "abc"] == ["0", "1", "1"]
    assert calls["b"]["end"] <= calls["c"]["start"]  # the same GPU: one after the other
    assert calls["a"]["start"] < calls["b"]["end"] and calls["b"]["start"] < calls["a"]["end"]  # side by side
    args_a, args_b = " ".join(calls["a"]["args"]), " ".join(calls["b"]["args"])
    assert "--stages 96:0.90:K=5,inner_lr=0.12 --out_dir" in args_a and "--seed 1 --time_budget_minutes 8" in args_a
    assert "--stages 2:0.95 4:0.95" in args_b and "--time_budget_minutes 2.5" in args_b
    assert args_b.endswith("--warmup_steps 100") and "--warmup_steps" not in " ".join(calls["c"]["args"])
    with tarfile.open(tmp_path / "out" / "metrics.tgz") as tar:
        names = tar.getnames()
    for run in (a, b, c):
        assert any(n.endswith(f"{run.name}/curriculum.json") for n in names)
        assert any(n.endswith(f"{run.name}/sittings.log") for n in names)


def test_a_bad_jobs_file_is_refused_before_anything_runs(tmp_path):
    for jobs, message in (("x 8 SEED=1 OUT_DIR=runs/a\n", "first field must be a GPU index"),
                          ("0 soon SEED=1 OUT_DIR=runs/a\n", "second field must be minutes"),
                          ("0 8 SEED=1\n", "set OUT_DIR="),
                          ("# nothing\n", "holds no job")):
        done = run_sitting(tmp_path, jobs)
        assert done.returncode == 2 and message in done.stderr, (jobs, done.stderr)
        assert not (tmp_path / "calls.jsonl").exists() and not (tmp_path / "out").exists()


def test_copy_fills_one_folder_from_several_sources_once(tmp_path, monkeypatch):
    records, state, run = tmp_path / "records", tmp_path / "state", tmp_path / "runs" / "a"
    (records / "N96").mkdir(parents=True)
    (records / "curriculum.json").write_text("{}")
    (state / "N96" / "checkpoint-5").mkdir(parents=True)
    (state / "N96" / "checkpoint-5" / "weights").write_text("w")
    jobs = f"0 1 SEED=1 OUT_DIR={run} STAGES=\"96:0.90\"\n"
    monkeypatch.setenv("COPY", f"{records}:{run} {state}:{run}")
    done = run_sitting(tmp_path, jobs)
    assert done.returncode == 0, done.stderr
    assert (run / "N96" / "checkpoint-5" / "weights").read_text() == "w"
    (run / "N96" / "checkpoint-5" / "weights").write_text("trained on")  # the sitting's runs wrote on
    assert run_sitting(tmp_path, jobs).returncode == 0
    assert (run / "N96" / "checkpoint-5" / "weights").read_text() == "trained on"  # not copied over again
    monkeypatch.setenv("COPY", f"{tmp_path / 'missing'}:{run}")
    done = run_sitting(tmp_path, jobs)
    assert done.returncode == 2 and "must be src:dst with src a folder" in done.stderr


def test_command_jobs_run_in_their_gpus_queue_with_out_set(tmp_path):
    run = tmp_path / "runs" / "a"
    jobs = (f"0 1 SEED=1 OUT_DIR={run} STAGES=\"2:0.95\"\n"
            "0 0.1 ! echo \"gpu $CUDA_VISIBLE_DEVICES\" > $OUT/mark.txt; date +%s.%N >> $OUT/mark.txt\n"
            "1 0.02 ! sleep 30\n")  # stopped after 1.2 s
    done = run_sitting(tmp_path, jobs)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    gpu_line, when = (out / "mark.txt").read_text().split("\n")[:2]
    [call] = map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())
    assert gpu_line == "gpu 0" and float(when) >= call["end"]  # after the preset job of its GPU
    assert "job 2 (GPU 1, command) exit 124" in done.stdout  # timeout's exit status: stopped after its minutes
    assert (out / "job_1.log").exists() and (out / "metrics.tgz").exists()
    for bad in ("0 1 !\n", "0 1 !   \n"):
        refused = run_sitting(tmp_path, bad)
        assert refused.returncode == 2 and "no command after !" in refused.stderr


def test_every_committed_jobs_file_checks_and_bad_stages_are_refused(tmp_path):
    """DRY_RUN=1 checks a jobs file (every STAGES parsed as the curriculum parses them) and runs nothing: every file
    under bench/sittings passes; a stage the curriculum would refuse stops the sitting before anything runs."""
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(tmp_path / "out")}
    for jobs in sorted((REPO / "bench" / "sittings").glob("*.jobs")):
        done = subprocess.run(["bash", str(REPO / "bench" / "capacity_sitting.sh")], env={**env, "JOBS": str(jobs)},
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (jobs.name, done.stderr)
        assert done.stdout.startswith("GPU ") and not (tmp_path / "out").exists()
    (tmp_path / "bad.jobs").write_text('0 1 SEED=1 OUT_DIR=runs/x STAGES="2:0.95 4:1.5"\n')
    done = subprocess.run(["bash", str(REPO / "bench" / "capacity_sitting.sh")],
                          env={**os.environ, "JOBS": str(tmp_path / "bad.jobs"), "OUT": str(tmp_path / "out")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "its STAGES do not parse" in done.stderr and not (tmp_path / "out").exists()


def test_minutes_replaces_every_jobs_budget_and_a_bad_value_is_refused(tmp_path):
    """MINUTES=<m> gives every job m minutes of training instead of its line's (a session's last command fills the
    device time left); a value that is no number stops the sitting before anything runs."""
    done = run_sitting(tmp_path, f'0 7.8 SEED=1 OUT_DIR={tmp_path / "runs" / "a"} STAGES="96:0.90:K=5"\n',
                       MINUTES="8.6")
    assert done.returncode == 0, done.stderr
    (call,) = map(json.loads, (tmp_path / "calls.jsonl").read_text().splitlines())
    assert "--time_budget_minutes 8.6" in " ".join(call["args"])
    refused = run_sitting(tmp_path, f'0 7.8 SEED=1 OUT_DIR={tmp_path / "runs" / "b"}\n', MINUTES="9m")
    assert refused.returncode == 2 and "MINUTES=9m: give every job's training minutes as a number" in refused.stderr
    assert not (tmp_path / "runs" / "b").exists()
