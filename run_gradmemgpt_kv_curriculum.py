"""GradMem on KV retrieval with a curriculum over N, in one process (see curriculum.py for the stage format).

    python run_gradmemgpt_kv_curriculum.py --stages 2:0.95 4:0.95 8:0.95 16:0.95 32:0.95 \\
        --out_dir runs/kv_curriculum/seed_1 --seed 1 -- --fp32 --tf32
    (scripts/run_kv_capacity.sh is the preset: the paper's KV model, N2 -> N96.)

Each stage is one call of run_gradmemgpt_on_kv_retrieval.main with the arguments after `--` (shared by every stage),
the stage's data (`<data_dir>/N<n>-K2V2-V62_<data_size>`, generated if missing), its own options, its schedule (the
first stage: --learning_rate with a constant schedule after --warmup_steps; later stages: --stage_learning_rate,
--stage_warmup_steps, then a linear decay over --stage_steps) and `--init_checkpoint` = the previous stage's best
checkpoint. One process for all stages: Python, CUDA and the compiled kernels start once.

`<out_dir>/curriculum.json` records every stage of every invocation: steps, wall time from the start of the
invocation (datasets are built before the clock starts), valid and test exact match (teacher-forced and generated) of
the selected checkpoint, the final checkpoint's where it differs, the guards' interventions, and where the stage's time
went (train_wall_s: training with its evaluations; final_evaluation_wall_s; the rest is set-up). Re-running the same
command resumes where the last one stopped (`--time_budget_minutes` splits long curricula into sittings).
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import curriculum
import kv_dataset_utils
import run_gradmemgpt_on_kv_retrieval as run_kv
from training_args import run_cli

RECORD = "curriculum.json"
REPORTED = ("eval_exact_match", "eval_generated_exact_match", "test_exact_match", "test_generated_exact_match",
            "final_eval_exact_match", "final_test_generated_exact_match", "global_step", "skipped_steps",
            "spike_skipped_steps", "rollbacks", "train_wall_s", "final_evaluation_wall_s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", nargs="+", required=True, help="N[:threshold[:option=value,...]] per stage")
    p.add_argument("--out_dir", required=True, help="one run folder per stage: <out_dir>/N<n>")
    p.add_argument("--seed", type=int, default=1, help="run seed (model init, data order) of every stage")
    p.add_argument("--data_dir", default="./data", help="folder of the stages' KV datasets (generated if missing)")
    p.add_argument("--data_size", default="1M", help="train samples of each stage's dataset (name suffix)")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="first stage, constant after the warmup")
    p.add_argument("--warmup_steps", type=int, default=300, help="first stage's lr warmup steps")
    p.add_argument("--max_steps", type=int, default=100_000, help="first stage's step budget")
    p.add_argument("--stage_learning_rate", type=float, default=5e-4, help="later stages' peak lr")
    p.add_argument("--stage_warmup_steps", type=int, default=100, help="later stages' lr warmup steps")
    p.add_argument("--stage_steps", type=int, default=36_000,
                   help="later stages: step budget; the lr decays linearly to 10%% of its peak at this step")
    p.add_argument("--time_budget_minutes", type=float, default=None,
                   help="wall-clock budget of this invocation (a stage stops at the first step past it, evaluated "
                        "and saved; re-run to resume)")
    return p


def stage_arguments(args, stage: curriculum.Stage, index: int, init: Optional[str], shared: Sequence[str],
                    minutes_left: Optional[float]) -> list:
    """The run script's argv for one stage: shared options, then the stage's schedule, data and options."""
    first = index == 0
    schedule = {"learning_rate": args.learning_rate, "lr_scheduler_type": "constant_with_warmup",
                "warmup_steps": args.warmup_steps, "max_steps": args.max_steps} if first else {
        "learning_rate": args.stage_learning_rate, "lr_scheduler_type": "linear",
        "warmup_steps": args.stage_warmup_steps, "max_steps": args.stage_steps}
    options = {**schedule, "data_path": str(Path(args.data_dir) / dataset_name(stage, args.data_size)),
               "exp_path": str(Path(args.out_dir) / stage.name), "seed": args.seed,
               "stop_metric": "exact_match", "stop_metric_value": stage.threshold, **stage.options}
    if init is not None:
        options["init_checkpoint"] = init
    if minutes_left is not None:
        options["max_train_minutes"] = max(minutes_left, 0.1)
    argv = list(shared)
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv


def dataset_name(stage: curriculum.Stage, size: str) -> str:
    return f"N{stage.n_pairs}-K2V2-V62_{size}"


def max_steps_of(argv: Sequence[str]) -> int:
    """The last --max_steps in argv (stage options come after the shared ones and win)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--max_steps"]
    return int(values[-1])


def prepare_data(args, stage: curriculum.Stage) -> float:
    """Build the stage's dataset unless it exists; returns the seconds it took (data is an input, not training
    time: the caller keeps them off the curriculum's clock)."""
    start = time.monotonic()
    kv_dataset_utils.build_named_dataset(Path(args.data_dir) / dataset_name(stage, args.data_size))
    return time.monotonic() - start


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    shared = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        stages = curriculum.parse_stages(args.stages)
    except ValueError as error:
        parser.error(str(error))
    out_dir = Path(args.out_dir)
    record_file = out_dir / RECORD
    record = json.loads(record_file.read_text()) if record_file.is_file() else {"invocations": []}
    invocation = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": argv, "stages": []}
    record["invocations"].append(invocation)
    start = time.monotonic()
    init = None
    for index, stage in enumerate(stages):
        minutes_left = None
        if args.time_budget_minutes is not None:
            minutes_left = args.time_budget_minutes - (time.monotonic() - start) / 60
            if minutes_left <= 0:
                print(f"time budget spent before {stage.name}: re-run the same command to go on", flush=True)
                return 3
        stage_argv = stage_arguments(args, stage, index, init, shared, minutes_left)
        status = curriculum.stage_status(out_dir / stage.name, stage, max_steps_of(stage_argv))
        if status.state == "stuck":
            print(f"{stage.name} ended at valid exact match {status.exact_match:.4f} < {stage.threshold} with no steps "
                  f"left (step {status.global_step}): give it more steps (e.g. {stage.n_pairs}:{stage.threshold}:"
                  f"max_steps=...) or another recipe", flush=True)
            return 1
        if status.state != "done":
            start += prepare_data(args, stage)  # the clock skips dataset building
            stage_start = time.monotonic() - start
            print(f"=== {stage.name} ({status.state}): {' '.join(stage_argv)}", flush=True)
            metrics = run_kv.main(stage_argv)
            entry = {"stage": stage.name, "threshold": stage.threshold, "options": stage.options,
                     "start_s": round(stage_start, 1), "end_s": round(time.monotonic() - start, 1),
                     **{k: metrics[k] for k in REPORTED if k in metrics}}
            invocation["stages"].append(entry)
            out_dir.mkdir(parents=True, exist_ok=True)
            record_file.write_text(json.dumps(record, indent=2) + "\n")
            status = curriculum.stage_status(out_dir / stage.name, stage, max_steps_of(stage_argv))
            if status.state != "done":
                what = ("re-run the same command to go on" if status.state == "resume" else
                        "no steps left: give it more steps or another recipe")
                print(f"{stage.name} stopped at valid exact match {status.exact_match} (threshold {stage.threshold}, "
                      f"step {status.global_step}): {what}", flush=True)
                return 3 if status.state == "resume" else 1
        print(f"{stage.name} done: valid exact match {status.exact_match:.4f} >= {stage.threshold} "
              f"(best checkpoint {status.best_checkpoint})", flush=True)
        init = status.best_checkpoint
    return 0


if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
