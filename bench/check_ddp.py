"""Multi-GPU check and scaling benchmark: DDP through accelerate gives one GPU's numbers, and how much faster.

    python bench/check_ddp.py --out bench/results          (a machine with >= 2 GPUs; about 2-3 minutes)
    OUT=/some/folder python bench/check_ddp.py              (--out defaults to $OUT, else bench/results)

1. Equality. One optimizer step of the paper's GradMem KV preset (llama L4 H4 D128, 8 memory tokens, K=2 SGD inner
   steps, inner lr 0.04, second order, write head, inner loss added with weight 0.5, eager attention) and of the RMT
   preset (8 memory vectors, K=1, write-side projection, sdpa), fp32 with TF32 off, on the same B=64 samples of
   N8-K2V2-V62: one GPU with batch B against NP GPUs with B/NP each (accelerate + DDP, find_unused_parameters off,
   parameters without gradient frozen as the trainer does). Compared: the loss (mean over processes), the
   all-reduced and clipped gradient, and the AdamW parameter update, as relative L2 errors ||a - b|| / ||b||.
   Tolerances: loss and gradient 1e-5 (fp32 round-off; the bound used for fp32 gradient agreement); update
   1e-4, because Adam's first step divides every gradient element by its own magnitude (update ~ lr g / (|g| +
   1e-8)), so elements with |g| near 1e-8 pass their round-off to the update undamped. For scale, the table also
   gives the errors of the same step on one GPU run as two accumulated micro-batches of B/2 (the same arithmetic
   as DDP, without any communication). And the trainer itself (run_experiment, as in 2.): 3 steps on a train set
   of exactly 64 samples at total batch 64, on NP GPUs against one GPU (same samples in every step, any
   data order), compared by the mean logged training loss and the parameter change.
2. Throughput of the paper preset through the project's trainer (run_experiment: dataloader workers,
   DDP, AdamW, gradient clipping) on 1, 2, 4 and 8 GPUs, as many as there are: weak scaling (64 samples per GPU,
   total 64 x NP) and strong scaling (total 64, 64 / NP per GPU); median time between step starts over --steps
   steps after --warmup steps.
Writes <out>/ddp_check.md (tables, cards, package versions, command, date) and prints a summary last.
Each configuration runs in its own `accelerate launch` (accelerate.yaml for one GPU, accelerate_ddp.yaml for more).
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA_NAME = "N8-K2V2-V62"
BATCH = 64
TOLERANCE = {"loss_diff": 1e-5, "grad": 1e-5, "update": 1e-4}
MODELS = ("gradmem", "rmt")
CAPTURED = "gradmem_captured"  # the GradMem step through fast_step.CapturedTrainStep, compared with one eager GPU
TRAINER = "gradmem_trainer"  # TRAINER_STEPS steps through the project's trainer, compared with the trainer on one GPU
TRAINER_STEPS = 3


# ---------------------------------------------------------------------------------------------------------------
# worker: runs under accelerate launch, one copy per GPU

def build(kind: str, tokenizer):
    """The preset model, built by the models' builders (GradMem: `--preset paper_kv`, the paper's KV model)."""
    from training_args import BackboneArgs, parse_cli

    if kind == "gradmem":
        from grad_memgpt import PRESETS, GradMemArgs, build_grad_memgpt

        backbone_args, gradmem_args = parse_cli(BackboneArgs, GradMemArgs, args=["--preset", "paper_kv"],
                                                presets=PRESETS)
        return build_grad_memgpt(backbone_args, gradmem_args, tokenizer)
    backbone_args = BackboneArgs()
    backbone_args.validate()
    from rmt import RMTArgs, build_rmt

    rmt_args = RMTArgs(n_mem_tokens=8, K=1, use_mem_proj=True, mem_proj_mode="proj", attn_implementation="sdpa")
    rmt_args.validate()
    return build_rmt(backbone_args, rmt_args, tokenizer)


def one_step(kind, tokenizer, batch, accelerator, micro_batches=1):
    """One AdamW step (lr 1e-4, clip 1.0) from seed 0 on this process's rows of `batch`, as `micro_batches`
    accumulated parts. Returns (loss averaged over processes, gradient, update), the last two on the CPU."""
    import training_loop

    torch.manual_seed(0)
    model = build(kind, tokenizer)
    training_loop.freeze_parameters_without_gradient(model)
    model.to(accelerator.device).train()
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = training_loop.NonFiniteStepSkippingAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    local = {k: v.chunk(world)[rank].to(accelerator.device) for k, v in batch.items()}
    total = 0.0
    for part in range(micro_batches):
        rows = {k: v.chunk(micro_batches)[part] for k, v in local.items()}
        loss = wrapped(**rows).loss / micro_batches
        accelerator.backward(loss)
        total = total + loss.detach()
    accelerator.clip_grad_norm_(model.parameters(), 1.0)
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    update = {n: p.detach().cpu() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    loss = accelerator.reduce(total, "mean")
    accelerator.free_memory()
    return float(loss), grads, update


def one_captured_step(tokenizer, batch, accelerator):
    """The same GradMem step through fast_step.CapturedTrainStep (recorded in a CUDA graph on a GPU, its eager code on
    the CPU), the gradients averaged over the processes inside the step instead of by DDP."""
    import training_loop
    from fast_step import CapturedTrainStep

    torch.manual_seed(0)
    model = build("gradmem", tokenizer)
    training_loop.freeze_parameters_without_gradient(model)
    model.to(accelerator.device).train()
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = training_loop.NonFiniteStepSkippingAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rank, world = accelerator.process_index, accelerator.num_processes
    group = torch.distributed.group.WORLD if world > 1 else None
    step = CapturedTrainStep(model, optimizer, max_grad_norm=1.0, precision="fp32",
                             use_cuda_graph=torch.cuda.is_available(), process_group=group)
    out = step({k: v.chunk(world)[rank].to(accelerator.device) for k, v in batch.items()})
    grads = {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    update = {n: p.detach().cpu() - before[n] for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss), grads, update  # the loss is already the mean over the processes


class StepTimer(TrainerCallback):
    """Wall time between consecutive step starts (CUDA synchronised): data loading, forward, backward, DDP
    all-reduce, clipping and the optimizer step of each training step."""

    def __init__(self):
        self.starts = []

    def _mark(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def on_step_begin(self, args, state, control, **kwargs):
        self._mark()

    def on_train_end(self, args, state, control, **kwargs):
        self._mark()

    def step_times(self, warmup: int) -> list:
        intervals = [b - a for a, b in zip(self.starts, self.starts[1:])]
        return intervals[warmup:]


class StateAfterSteps(TrainerCallback):
    """The trainable parameters right after the optimizer step of step `steps`, and the logged training loss."""

    def __init__(self, steps: int):
        self.steps, self.params, self.loss = steps, None, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.steps:
            self.params = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and self.loss is None:
            self.loss = logs["loss"]


def train_preset(kind, tokenizer, splits, accelerator, per_device, max_steps, run_dir, fast_step, callback):
    """The paper preset through run_experiment (the trainer's DDP, captured step, AdamW, clipping): fp32,
    TF32 off, model from seed 0, lr schedule constant, one training-loss log over all `max_steps` steps."""
    from training_args import TrainArgs
    from training_collators import MemoryModelCollator, make_compute_metrics
    from training_experiment import run_experiment

    world = accelerator.num_processes
    torch.manual_seed(0)
    model = build(kind, tokenizer)
    args = TrainArgs(
        exp_path=str(run_dir), overwrite=True, per_device_batch_size=per_device, total_batch_size=per_device * world,
        max_steps=max_steps, eval_steps=10 * max_steps, logging_steps=max_steps, warmup_steps=0,
        lr_scheduler_type="constant", max_eval_samples=BATCH, report_to="none", early_stopping_patience=0,
        stop_metric_value=None, fp32=True, use_cpu=not torch.cuda.is_available(), fast_step=fast_step)
    args.validate()
    before = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    run_experiment(args, model, tokenizer, splits, MemoryModelCollator(tokenizer), make_compute_metrics(tokenizer),
                   data_name=DATA_NAME, extra_callbacks=[callback])
    return before


def trainer_steps(tokenizer, splits, accelerator, run_dir, fast_step):
    """TRAINER_STEPS steps of GradMem through the trainer on a train set of exactly BATCH samples with total batch
    BATCH: every step averages over the same samples whatever the data order and the split over processes, so the
    update must equal one GPU's. Returns (mean logged training loss, parameter update on the CPU)."""
    world = accelerator.num_processes
    state = StateAfterSteps(TRAINER_STEPS)
    one_batch = dict(splits, train=splits["train"].select(range(BATCH)))
    before = train_preset("gradmem", tokenizer, one_batch, accelerator, BATCH // world, TRAINER_STEPS, run_dir,
                          fast_step, state)
    return state.loss, {n: state.params[n] - before[n] for n in state.params}


def throughput(kind, tokenizer, splits, accelerator, per_device, steps, warmup, run_dir, fast_step):
    timer = StepTimer()
    train_preset(kind, tokenizer, splits, accelerator, per_device, warmup + steps, run_dir, fast_step, timer)
    times = timer.step_times(warmup)
    return {"per_device": per_device, "total": per_device * accelerator.num_processes, "step_ms": 1000 * statistics.median(times),
            "step_ms_min": 1000 * min(times), "step_ms_max": 1000 * max(times), "n_steps": len(times)}


def worker(work: Path, steps: int, warmup: int, cpu: bool, fast_step: str) -> None:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    import training_args
    import training_backbone
    import training_collators
    import training_data
    import training_run_folder

    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"  # strict fp32
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    world, rank = accelerator.num_processes, accelerator.process_index
    tokenizer = training_backbone.load_tokenizer(training_args.BackboneArgs())
    splits = training_data.load_splits(str(work / "data" / DATA_NAME))
    collator = training_collators.MemoryModelCollator(tokenizer)
    batch = collator([splits["train"][i] for i in range(BATCH)])

    result = {"num_processes": world, "equality": {}, "throughput": {}}
    for kind in MODELS:
        loss, grads, update = one_step(kind, tokenizer, batch, accelerator)
        entry = {"loss": loss}
        if rank == 0:
            torch.save({"grads": grads, "update": update}, work / f"step_{kind}_np{world}.pt")
        if world == 1:  # the round-off scale: the same step as two accumulated halves on one GPU
            loss2, grads2, update2 = one_step(kind, tokenizer, batch, accelerator, micro_batches=2)
            entry["loss_accumulated"] = loss2
            torch.save({"grads": grads2, "update": update2}, work / f"step_{kind}_np1_acc2.pt")
        result["equality"][kind] = entry
    loss, grads, update = one_captured_step(tokenizer, batch, accelerator)
    result["equality"][CAPTURED] = {"loss": loss}
    if rank == 0:
        torch.save({"grads": grads, "update": update}, work / f"step_{CAPTURED}_np{world}.pt")
    del grads, update
    loss, update = trainer_steps(tokenizer, splits, accelerator, work / "runs" / f"np{world}_trainer", fast_step)
    result["equality"][TRAINER] = {"loss": loss}
    if rank == 0:
        torch.save({"grads": {}, "update": update}, work / f"step_{TRAINER}_np{world}.pt")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    result["throughput"]["weak"] = throughput("gradmem", tokenizer, splits, accelerator, BATCH, steps, warmup,
                                              work / "runs" / f"np{world}_weak", fast_step)
    if world == 1:  # the same run
        result["throughput"]["strong"] = result["throughput"]["weak"]
    else:
        result["throughput"]["strong"] = throughput("gradmem", tokenizer, splits, accelerator, BATCH // world, steps,
                                                    warmup, work / "runs" / f"np{world}_strong", fast_step)
    if rank == 0:
        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke test)"
        result["versions"] = training_run_folder.package_versions()
        (work / f"result_np{world}.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# driver

def relative_error(a: dict, b: dict) -> float:
    diff = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    norm = sum(float(b[n].double().pow(2).sum()) for n in b)
    return (diff / norm) ** 0.5 if norm > 0 else float("inf")


def compare(work: Path, kind: str, np_: int, results: dict) -> dict:
    """Errors of `kind` on np_ processes (np_ = 1: two accumulated halves; the captured step: itself on one GPU)
    against the eager one-GPU step of the same model; the trainer's steps against the trainer on one GPU (np_ > 1
    only; no gradients kept)."""
    base = {CAPTURED: "gradmem", TRAINER: TRAINER}.get(kind, kind)
    reference = torch.load(work / f"step_{base}_np1.pt")
    if kind == CAPTURED or np_ > 1:
        other, loss = torch.load(work / f"step_{kind}_np{np_}.pt"), results[np_]["equality"][kind]["loss"]
    else:
        other, loss = torch.load(work / f"step_{kind}_np1_acc2.pt"), results[1]["equality"][kind]["loss_accumulated"]
    loss_ref = results[1]["equality"][base]["loss"]
    if sorted(reference["update"]) != sorted(other["update"]):
        raise RuntimeError(f"{kind}: the trained parameters differ between 1 and {np_} processes")
    errors = {"loss_diff": abs(loss - loss_ref) / abs(loss_ref),
              "update": relative_error(other["update"], reference["update"])}
    if reference["grads"]:
        errors["grad"] = relative_error(other["grads"], reference["grads"])
    return {"loss_ref": loss_ref, "loss": loss, **errors,
            "pass": all(errors[k] <= TOLERANCE[k] for k in errors)}


def grad_text(entry: dict) -> str:
    """The gradient error of a compare() entry, "-" where none was kept (the trainer rows)."""
    return f"{entry['grad']:.1e}" if "grad" in entry else "-"


def launch(np_: int, work: Path, args, port: int) -> None:
    config = "accelerate.yaml" if np_ == 1 else "accelerate_ddp.yaml"
    worker_args = [str(Path(__file__).resolve()), "--worker", "--work", str(work), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--fast_step", args.fast_step]
    if args.cpu:  # accelerate launch runs one process on the CPU; torchrun starts the gloo processes
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(np_),
                   *worker_args, "--cpu"]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config),
                   "--num_processes", str(np_),
                   "--mixed_precision", "no", "--main_process_port", str(port), *worker_args]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TOKENIZERS_PARALLELISM="false")
    print(f"[check_ddp] {' '.join(command)}", flush=True)
    log = work / f"log_np{np_}.txt"
    start = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT,
                              timeout=args.launch_timeout)
    print(f"[check_ddp] NP={np_} finished in {time.time() - start:.0f} s (rc {done.returncode}, log {log})", flush=True)
    if done.returncode != 0:
        print(log.read_text()[-5000:], file=sys.stderr)
        raise SystemExit(f"NP={np_} failed (see {log})")


def markdown(results: dict, equality: dict, command: str, elapsed: float, fast_step: str) -> str:
    first = results[min(results)]
    versions = first["versions"]
    lines = [
        "# Multi-GPU (DDP through accelerate): equality with one GPU and scaling",
        "",
        f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on {len(results) and max(results)} x "
        f"{first['device']}; torch {versions['torch']} (CUDA {versions['cuda']}), transformers "
        f"{versions['transformers']}, accelerate {versions['accelerate']}, python {versions['python']}.",
        f"Command: `{command}` ({elapsed:.0f} s in all).",
        "",
        f"## One step: NP GPUs with batch {BATCH}/NP each vs one GPU with batch {BATCH}",
        "",
        f"Data {DATA_NAME} (first {BATCH} train samples, seed 0), fp32, TF32 off, AdamW lr 1e-4, clipping 1.0. "
        f"Relative L2 errors against one GPU; tolerances: loss {TOLERANCE['loss_diff']:g}, gradient "
        f"{TOLERANCE['grad']:g}, update {TOLERANCE['update']:g} (Adam's first step is lr g / (|g| + 1e-8) per element, "
        "which passes the round-off of elements with |g| near 1e-8 to the update undamped). The `1 (2 x B/2 "
        "accumulated)` row is the same step on one GPU in two micro-batches: the round-off scale of splitting the "
        "batch at all. The captured rows run the same GradMem step through fast_step.CapturedTrainStep (one CUDA "
        "graph: forward, backward, one NCCL all-reduce of the flat gradients and loss, clipping, AdamW) and are "
        "compared with the eager one-GPU step. The trainer rows run "
        f"{TRAINER_STEPS} steps of run_experiment (as the throughput runs below: under several processes "
        "the captured step on the DDP-wrapped model, or eager DDP with `--fast_step off`) on a train set of exactly "
        f"{BATCH} samples, total batch {BATCH}, so each step averages over the same samples on any number of GPUs; "
        "loss = the mean logged training loss of those steps, update = the parameter change after them.",
        "",
        "| model | GPUs | loss (1 GPU) | loss | loss rel. diff | gradient rel. error | update rel. error | pass |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (kind, np_), e in sorted(equality.items()):
        if kind == CAPTURED:
            gpus = f"{np_} (gradients averaged inside the graph)" if np_ > 1 else "1"
        elif kind == TRAINER:
            gpus = f"{np_} (trainer under DDP) vs 1 (trainer)"
        else:
            gpus = f"{np_} (DDP)" if np_ > 1 else "1 (2 x B/2 accumulated)"
        name = {"gradmem": "GradMem, second order (paper KV preset)", "rmt": "RMT (KV preset)",
                CAPTURED: "GradMem, captured step (fast_step)",
                TRAINER: f"GradMem, {TRAINER_STEPS} steps of the trainer (`--fast_step {fast_step}`)"}[kind]
        lines.append(f"| {name} | {gpus} | {e['loss_ref']:.7f} | {e['loss']:.7f} | {e['loss_diff']:.1e} | "
                     f"{grad_text(e)} | {e['update']:.1e} | {'yes' if e['pass'] else 'NO'} |")
    lines += [
        "",
        "## Throughput of the paper preset (GradMem, run_experiment)",
        "",
        "Median time between step starts (dataloader, forward with K=2 second-order WRITE, backward, DDP all-reduce, "
        "clipping, AdamW) over the timed steps; samples/s = total batch / median step time. Weak scaling: 64 samples "
        "per GPU (total 64 x NP); strong scaling: total 64 (64 / NP per GPU). Speed-up: samples/s over one GPU's.",
        "",
        "| scaling | GPUs | per-GPU batch | total batch | step ms (median, min-max) | samples/s | speed-up | efficiency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("weak", "strong"):
        base = results[1]["throughput"][mode]
        base_rate = base["total"] / base["step_ms"]
        for np_ in sorted(results):
            t = results[np_]["throughput"][mode]
            rate = t["total"] / t["step_ms"]
            lines.append(f"| {mode} | {np_} | {t['per_device']} | {t['total']} | {t['step_ms']:.1f} "
                         f"({t['step_ms_min']:.1f}-{t['step_ms_max']:.1f}) | {1000 * rate:.0f} | "
                         f"{rate / base_rate:.2f}x | {rate / base_rate / np_:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"),
                        help="folder for ddp_check.md (default: $OUT, else bench/results)")
    parser.add_argument("--gpus", default=None, help="comma list of GPU counts (default: 1, 2, 4, 8 up to the count)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps per throughput run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--launch_timeout", type=int, default=240, help="seconds per accelerate launch")
    parser.add_argument("--work", default=None, help="scratch folder (default: <out>/ddp_check_work, removed after)")
    parser.add_argument("--cpu", action="store_true",
                        help="smoke test of this script on the CPU (gloo processes; the numbers mean nothing)")
    parser.add_argument("--fast_step", choices=("auto", "off"), default="auto",
                        help="the trainer's --fast_step for the trainer and throughput runs (auto: the captured "
                             "CUDA-graph step, on any number of GPUs; off: eager (DDP) steps)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.work), args.steps, args.warmup, args.cpu, args.fast_step)
        return

    import kv_dataset_utils

    available = torch.cuda.device_count() if not args.cpu else 2
    counts = ([int(c) for c in args.gpus.split(",")] if args.gpus else [n for n in (1, 2, 4, 8) if n <= available])
    if 1 not in counts or len(counts) < 2:
        raise SystemExit(f"need 1 and at least one more GPU count (have {available} GPUs, --gpus {args.gpus})")
    if max(counts) > available:
        raise SystemExit(f"--gpus {args.gpus}: only {available} GPUs here")
    if args.steps < 3 or args.warmup < 1:
        raise SystemExit("--steps must be >= 3 and --warmup >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out / "ddp_check_work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "data").mkdir(parents=True)
    start = time.time()

    # data: enough fresh samples for the largest weak-scaling run
    spec = kv_dataset_utils.parse_dataset_name(DATA_NAME)
    n_train = (args.steps + args.warmup + 2) * BATCH * max(counts)
    splits = kv_dataset_utils.build_kv_dataset_dict(spec, n_train=n_train, n_valid=BATCH, seed=0)
    kv_dataset_utils.save_kv_dataset(splits, work / "data" / DATA_NAME, spec, 0)

    results = {}
    for i, np_ in enumerate(counts):
        launch(np_, work, args, port=29650 + i)
        results[np_] = json.loads((work / f"result_np{np_}.json").read_text())
    equality = {}
    for kind in (*MODELS, CAPTURED, TRAINER):
        for np_ in counts:
            if kind != TRAINER or np_ > 1:
                equality[(kind, np_)] = compare(work, kind, np_, results)
    command = "python bench/check_ddp.py" + "".join(f" {a}" for a in sys.argv[1:])
    text = markdown(results, equality, command, time.time() - start, args.fast_step)
    (out / "ddp_check.md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)

    print(text)
    print("=" * 100)
    print(f"[check_ddp] wrote {out / 'ddp_check.md'} ({time.time() - start:.0f} s)")
    for (kind, np_), e in sorted(equality.items()):
        label = f"{np_} GPUs" if np_ > 1 else "1 GPU" if kind == CAPTURED else "1 GPU, 2 accumulated halves"
        print(f"  equality {kind:8s} {label:28s} loss {e['loss_diff']:.1e}  grad {grad_text(e)}  update "
              f"{e['update']:.1e}  -> {'PASS' if e['pass'] else 'FAIL'} (tolerances {TOLERANCE['loss_diff']:g} / "
              f"{TOLERANCE['grad']:g} / {TOLERANCE['update']:g})")
    for mode in ("weak", "strong"):
        base = results[1]["throughput"][mode]
        speedups = ", ".join(
            f"{np_} GPUs {results[np_]['throughput'][mode]['total'] / results[np_]['throughput'][mode]['step_ms'] / (base['total'] / base['step_ms']):.2f}x"
            for np_ in counts if np_ > 1)
        print(f"  {mode:6s} scaling: 1 GPU {base['step_ms']:.1f} ms/step (batch {base['total']}); speed-up {speedups}")


if __name__ == "__main__":
    main()
