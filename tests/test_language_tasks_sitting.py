"""bench/language_tasks_sitting.sh on the CPU with tiny sizes: the data and tokenizers it builds, the run command of
every family and task (each trains 2 steps here and reports the test exact match of generated answers), the report
(bench/lang_sitting_report.py), the packed metrics and a re-launch that resumes (here: reports the finished run)."""
import importlib
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SITTING = REPO / "bench" / "language_tasks_sitting.sh"
sys.path.insert(0, str(REPO / "bench"))

import lang_sitting_report  # noqa: E402

TINY = {"SEEDS": "1", "FAMILIES": "gradmem lm rmt", "N_TRAIN": "40", "N_VALID": "4", "N_TEST": "4", "STEPS": "2",
        "N_LAYER": "1", "N_HEAD": "2", "N_EMBD": "16", "BATCH": "4", "WORKERS": "0", "PRECISION": "fp32",
        "WARMUP": "0", "GEN_EVAL": "4", "NGPU": "0"}
SCRIPTS = {("gradmem", "phonebook"): "run_gradmemgpt_on_phonebook.py", ("gradmem", "babi"): "run_gradmemgpt_on_babi.py",
           ("lm", "phonebook"): "run_gpt2_on_phonebook.py", ("lm", "babi"): "run_gpt2_on_babi.py",
           ("rmt", "phonebook"): "run_rmt_on_phonebook.py", ("rmt", "babi"): "run_rmt_on_babi.py"}


@pytest.fixture(autouse=True)
def restore_precision_env(monkeypatch):
    """run_experiment writes ACCELERATE_MIXED_PRECISION into os.environ; undo it after each test."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))


def sitting(tmp: Path, data: Path, **env) -> subprocess.CompletedProcess:
    places = {"DATA": str(data), "RUNS": str(tmp / "runs"), "OUT": str(tmp / "out")}
    return subprocess.run(["bash", str(SITTING)], env={**os.environ, **TINY, **places, **env}, capture_output=True,
                          text=True, timeout=600)


def flag_values(args: list) -> dict:
    """{--flag: the word after it} of a command line's arguments."""
    return {flag: args[i + 1] for i, flag in enumerate(args) if flag.startswith("--") and i + 1 < len(args)}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """DRY_RUN=1: the data and tokenizers are built, every run's command printed."""
    tmp = tmp_path_factory.mktemp("sitting")
    done = sitting(tmp, tmp / "data", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    commands = [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("CUDA_VISIBLE_DEVICES=")]
    return tmp, commands


def test_data_and_tokenizers_are_built_locally(dry_run):
    tmp, _ = dry_run
    data = tmp / "data"
    assert sorted(p.name for p in (data / "babi_qa1").iterdir()) == [
        f"qa1_single-supporting-fact_{split}.txt" for split in ("test", "train", "valid")]
    from datasets import load_from_disk

    phonebook = load_from_disk(str(data / "phonebook_N4"))
    assert {split: len(rows) for split, rows in phonebook.items()} == {"train": 40, "valid": 4, "test": 4}
    for name in ("tok_phonebook_N4", "tok_babi_qa1"):
        config = json.loads((data / name / "tokenizer_config.json").read_text())
        assert config["pad_token"] == "<pad>", name


def test_every_run_command_trains_and_reports_test_exact_match(dry_run):
    tmp, commands = dry_run
    assert len(commands) == 6
    runs = tmp / "runs"
    for command in commands:
        assert command[0] == "CUDA_VISIBLE_DEVICES=" and command[1] == "python3"  # no GPU: none visible
        script, args = command[2], command[3:]
        value = flag_values(args)
        family, task = Path(value["--exp_path"]).parent.name, Path(value["--exp_path"]).parent.parent.name
        assert script == SCRIPTS[(family, task.split("_")[0])]
        assert value["--base_model"] == "llama" and value["--max_steps"] == "2" and "--use_cpu" in args
        assert Path(value["--tokenizer_path"]).parent == tmp / "data"
        assert value["--exp_path"] == str(runs / task / family / "run_1")
        assert value["--metric_for_best_model"] == "squad_exact_match"
        importlib.import_module(script.removesuffix(".py")).main(args)
        results = json.loads((Path(value["--exp_path"]) / "all_results.json").read_text())
        assert results["global_step"] == 2 and 0.0 <= results["test_squad_exact_match"] <= 1.0
    text = lang_sitting_report.write_report(runs, tmp / "report", tmp / "data")
    rows = [line for line in text.splitlines() if line.startswith(("| babi_qa1 |", "| phonebook_N4 |"))]
    assert len(rows) == 12  # 6 runs, then 6 means over seeds
    assert "| phonebook_N4 | gradmem | 1 |" in text and "| 0.250 | 2 / 2 |" in text and "| 0.167 | 2 / 2 |" in text
    report = json.loads((tmp / "report" / "report.json").read_text())
    assert {(r["task"], r["family"]) for r in report["runs"]} == {
        (t, f) for t in ("phonebook_N4", "babi_qa1") for f in ("gradmem", "lm", "rmt")}
    assert all(r["curve"] and r["steps"] == 2 for r in report["runs"])
    shortcut = {r["task"]: r["shortcut"] for r in report["summary"]}
    assert 0.0 <= shortcut["babi_qa1"] <= 1.0 and shortcut["phonebook_N4"] != shortcut["phonebook_N4"]  # nan
    assert (tmp / "report" / "curves.png").stat().st_size > 0


def test_jobs_are_balanced_over_the_gpus(dry_run):
    tmp, _ = dry_run
    for visible, gpus in ((None, ("0", "1")), ("4,6", ("4", "6"))):  # GPUs already made visible are the ones used
        env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
        done = sitting(tmp, tmp / "data", DRY_RUN="1", NGPU="2", SEEDS="1 2 3", FAMILIES="gradmem lm", **env)
        assert done.returncode == 0, done.stderr
        per_gpu = {}
        for line in done.stdout.splitlines():
            if line.startswith("CUDA_VISIBLE_DEVICES="):
                gpu, family = line.split()[0].split("=")[1], Path(line.split("--exp_path ")[1].split()[0]).parent.name
                per_gpu.setdefault(gpu, []).append(family)
        assert {gpu: sorted(families) for gpu, families in per_gpu.items()} == {
            gpus[0]: ["gradmem"] * 3 + ["lm"] * 3, gpus[1]: ["gradmem"] * 3 + ["lm"] * 3}
        assert "12 runs on 2 lane(s)" in done.stdout
    done = sitting(tmp, tmp / "data", DRY_RUN="1", FAMILIES="mamba")
    assert done.returncode == 2 and "unknown family mamba" in done.stderr


def test_step_caps_follow_the_measured_step_times(dry_run):
    """Without STEPS the cap is what fits the run's training time: a step costs MS_<F> alone on a GPU plus
    MS_<F>_SHARED per other run sharing it, so the full-context LM (nearly free to share) gets more steps than
    GradMem when three runs share a GPU, and as many when each run has its GPU to itself."""
    tmp, _ = dry_run

    def caps(jobs_per_gpu):
        env = {key: value for key, value in TINY.items() if key != "STEPS"}
        done = subprocess.run(["bash", str(SITTING)], capture_output=True, text=True, timeout=600, env={
            **os.environ, **env, "DATA": str(tmp / "data"), "RUNS": str(tmp / "runs"), "OUT": str(tmp / "out"),
            "DRY_RUN": "1", "NGPU": "1", "N_LAYER": "4", "SEEDS": "1 2 3", "FAMILIES": "gradmem lm",
            "TASKS": "phonebook", "JOBS_PER_GPU": str(jobs_per_gpu), "SITTING_MINUTES": "8", "OVERHEAD_S": "30"})
        assert done.returncode == 0, done.stderr
        [line] = [line for line in done.stdout.splitlines() if line.startswith("sitting:")]
        words = line.split("steps: ")[1].split()
        return dict(zip(words[::2], map(int, words[1::2])))

    train_s = {1: 8 * 60 / 6 - 30, 3: 8 * 60 / 2 - 30}  # wall clock per run less the start-up share
    assert caps(1) == {"gradmem": int(train_s[1] * 1000 / 21 / 50) * 50, "lm": int(train_s[1] * 1000 / 21 / 50) * 50}
    assert caps(3) == {"gradmem": int(train_s[3] * 1000 / (21 + 2 * 14) / 50) * 50,
                       "lm": int(train_s[3] * 1000 / (21 + 2 * 2) / 50) * 50}


def test_one_cell_end_to_end_then_relaunched(dry_run):
    """TASKS/FAMILIES/SEEDS select one cell; the metrics come back packed without checkpoints; a re-launch of the same
    command finds the run finished and trains nothing."""
    data = dry_run[0] / "data"  # built already: the sitting reuses it
    tmp = data.parent / "one_cell"
    cell = {"TASKS": "babi", "FAMILIES": "lm", "SEEDS": "1"}
    done = sitting(tmp, data, **cell)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "babi lm seed 1: rc=0" in done.stdout and "| babi_qa1 | lm | 1 |" in done.stdout
    out = tmp / "out"
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "metrics.tgz", "report.json", "report.md"]
    with tarfile.open(out / "metrics.tgz") as packed:
        names = packed.getnames()
    assert "runs/babi_qa1/lm/run_1/all_results.json" in names and "runs/logs/babi_lm_1.log" in names
    assert not [n for n in names if "checkpoint-" in n or n.endswith((".safetensors", ".bin", ".pt"))]
    state = (tmp / "runs" / "babi_qa1" / "lm" / "run_1" / "trainer_state.json").read_text()
    done = sitting(tmp, data, **cell)
    assert done.returncode == 0 and "babi lm seed 1: rc=0" in done.stdout
    assert "nothing to train" in (tmp / "runs" / "logs" / "babi_lm_1.log").read_text()
    assert (tmp / "runs" / "babi_qa1" / "lm" / "run_1" / "trainer_state.json").read_text() == state


def test_bAbI_short_stories_first_then_the_full_ones_from_that_model(dry_run):
    """BABI_SHORT_STEPS: each bAbI run first trains that many steps on two-statement stories, then the rest of its
    steps on the full stories, warm-started from the short stories' model; too many short steps are refused."""
    data = dry_run[0] / "data"
    tmp = data.parent / "short"
    done = sitting(tmp, data, DRY_RUN="1", TASKS="babi", FAMILIES="gradmem lm", BABI_SHORT_STEPS="1")
    assert done.returncode == 0, done.stderr
    lines = (data / "babi_qa1_short" / "qa1_single-supporting-fact_train.txt").read_text().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["1", "2", "3"] * 40
    commands = [shlex.split(line)[2:] for line in done.stdout.splitlines() if line.startswith("CUDA_VISIBLE_DEVICES=")]
    assert len(commands) == 4
    for (short_script, *short), (script, *full) in zip(commands[::2], commands[1::2]):
        short_value, value = flag_values(short), flag_values(full)
        family = Path(value["--exp_path"]).parent.name
        assert short_script == script and short_value["--babi_dir"] == str(data / "babi_qa1_short")
        assert short_value["--exp_path"] == str(tmp / "runs" / "babi_qa1_short" / family / "run_1")
        assert value["--exp_path"] == str(tmp / "runs" / "babi_qa1" / family / "run_1")
        assert short_value["--max_steps"] == value["--max_steps"] == "1"  # STEPS=2 in all
        assert value["--init_checkpoint"] == short_value["--exp_path"] + "/model.safetensors"
        assert "--init_checkpoint" not in short_value
        for args in (short, full):  # the full stories' run loads the model the short stories' run saved
            importlib.import_module(script.removesuffix(".py")).main(args)
        assert json.loads((Path(value["--exp_path"]) / "all_results.json").read_text())["global_step"] == 1
    for steps, message in (("2", "leaves no step"), ("two", "give a number of steps")):
        done = sitting(tmp, data, DRY_RUN="1", TASKS="babi", BABI_SHORT_STEPS=steps)
        assert done.returncode == 2 and message in done.stderr


def test_phonebook_short_stage_first_then_the_full_one_from_that_model(dry_run):
    """PB_SHORT_STEPS: each phonebook run first trains that many steps on phone books of PB_SHORT_N entries (same
    tokenizer), then the rest on PB_N entries from that model; a short phone book as long as the full one is refused."""
    from datasets import load_from_disk

    data = dry_run[0] / "data"
    tmp = data.parent / "pb_short"
    done = sitting(tmp, data, DRY_RUN="1", TASKS="phonebook", FAMILIES="lm", PB_SHORT_STEPS="1", PB_SHORT_N="2")
    assert done.returncode == 0, done.stderr
    assert load_from_disk(str(data / "phonebook_N2"))["train"][0]["context"].count("\n") == 1  # two entries
    [(script, *short), (_, *full)] = [shlex.split(line)[2:] for line in done.stdout.splitlines()
                                      if line.startswith("CUDA_VISIBLE_DEVICES=")]
    short_value, value = flag_values(short), flag_values(full)
    assert short_value["--dataset_name"] == str(data / "phonebook_N2")
    assert value["--dataset_name"] == str(data / "phonebook_N4")
    assert short_value["--tokenizer_path"] == value["--tokenizer_path"] == str(data / "tok_phonebook_N4")
    assert short_value["--exp_path"] == str(tmp / "runs" / "phonebook_N2" / "lm" / "run_1")
    assert short_value["--max_steps"] == value["--max_steps"] == "1"  # STEPS=2 in all
    assert value["--init_checkpoint"] == short_value["--exp_path"] + "/model.safetensors"
    for args in (short, full):
        importlib.import_module(script.removesuffix(".py")).main(args)
    assert json.loads((Path(value["--exp_path"]) / "all_results.json").read_text())["global_step"] == 1
    # once the full run has started, the short stage is not resumed again: that would change its starting model
    done = sitting(tmp, data, DRY_RUN="1", TASKS="phonebook", FAMILIES="lm", PB_SHORT_STEPS="1", PB_SHORT_N="2")
    assert [flag_values(shlex.split(line))["--exp_path"] for line in done.stdout.splitlines()
            if line.startswith("CUDA_VISIBLE_DEVICES=")] == [value["--exp_path"]]
    assert "phonebook_short lm seed 1: kept as it ended (the phonebook run started from it)" in done.stdout
    for env, message in (({"PB_SHORT_N": "4"}, "PB_SHORT_N=4"),
                         ({"PB_SHORT_STEPS": "2"}, "PB_SHORT_STEPS=2 leaves no")):
        done = sitting(tmp, data, DRY_RUN="1", TASKS="phonebook", **{"PB_SHORT_STEPS": "1", **env})
        assert done.returncode == 2 and message in done.stderr


def test_short_stage_until_a_valid_exact_match_leaves_its_steps_to_the_full_run(dry_run):
    """SHORT_UNTIL: the short stage stops at that valid exact match (the trainer's --stop_metric_value), and the full
    run gets the steps and the time the short stage did not take (read from its all_results.json), or, resumed in a
    later sitting, the same steps and all of that sitting's time."""
    data = dry_run[0] / "data"
    tmp = data.parent / "short_until"
    env = dict(DRY_RUN="1", TASKS="phonebook", FAMILIES="lm", STEPS="6", PB_SHORT_STEPS="4", SHORT_UNTIL="0.9")

    def commands():
        done = sitting(tmp, data, **env)
        assert done.returncode == 0, done.stderr
        return [flag_values(shlex.split(line)) for line in done.stdout.splitlines()
                if line.startswith("CUDA_VISIBLE_DEVICES=")]

    short, full = commands()
    assert short["--stop_metric_value"] == "0.9" and short["--max_steps"] == "4" and full["--max_steps"] == "2"
    assert "--stop_metric_value" not in full
    short_run = Path(short["--exp_path"])
    short_run.mkdir(parents=True)
    # it reached 0.9 at step 1 after 3 s of training
    (short_run / "all_results.json").write_text(json.dumps({"global_step": 1, "train_wall_s": 3.0}))
    [short_again, full_after] = commands()  # the full run has not started: the short stage is still listed
    assert full_after["--max_steps"] == "5"
    whole = float(short["--max_train_minutes"]) + float(full["--max_train_minutes"])  # the job's share
    assert float(full_after["--max_train_minutes"]) == pytest.approx(whole - 3 / 60, abs=0.011)
    # the full run started in that sitting; resumed in a later one, it gets all of that one's share, the same steps
    Path(full_after["--exp_path"]).mkdir(parents=True)
    (Path(full_after["--exp_path"]) / "run_config.json").write_text("{}")
    [full_resumed] = commands()
    assert full_resumed["--max_steps"] == "5" and float(full_resumed["--max_train_minutes"]) == pytest.approx(whole,
                                                                                                         abs=0.011)
    done = sitting(tmp, data, **{**env, "SHORT_UNTIL": "95"})
    assert done.returncode == 2 and "SHORT_UNTIL=95: give a valid exact match in (0, 1]" in done.stderr


def test_bAbI_shortcut_is_the_last_room_the_story_names(tmp_path):
    """2 of the 3 questions are answered by the last room named (whoever went there), the third is not."""
    folder = tmp_path / "babi_qa1"
    folder.mkdir()
    (folder / "qa1_single-supporting-fact_test.txt").write_text(
        "1 Mary went to the kitchen.\n2 John moved to the garden.\n3 Where is John? \tgarden\t2\n"
        "4 Where is Mary? \tkitchen\t1\n1 Sandra went to the office.\n2 Where is Sandra? \toffice\t1\n")
    assert lang_sitting_report.shortcut_level("babi_qa1", tmp_path) == 2 / 3
    assert str(lang_sitting_report.shortcut_level("babi_qa1", tmp_path / "missing")) == "nan"  # no test file
    assert str(lang_sitting_report.shortcut_level("phonebook_N4", tmp_path)) == "nan"


def test_mean_curve_interpolates_seeds_on_their_own_grids_over_the_steps_all_cover():
    """Seed a evaluates every 100 steps, seed b every 150 and stops at 300: the mean at step 150 averages a's
    interpolated 0.15 with b's 0.3, not b alone (the zigzag of a mean over whichever seeds evaluated there), and
    ends at 300, where the shorter seed ends."""
    a = [(0, 0.0), (100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)]
    b = [(0, 0.0), (150, 0.3), (300, 0.6)]
    mean = lang_sitting_report.mean_curve([a, b])
    assert [s for s, _ in mean] == [0, 100, 150, 200, 300]
    assert [round(v, 6) for _, v in mean] == [0.0, 0.15, 0.225, 0.3, 0.45]
    assert lang_sitting_report.mean_curve([a]) == a
