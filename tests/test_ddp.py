"""Multi-process training (DDP) on the CPU: two gloo processes, started once by torchrun (this file is also the
worker script), run every scenario and report to the test process, whose tests check the report.

- unused parameters: GradMem in grad modes none / first / second with write head, write control tokens, per-sample
  projection and write LoRA; the parameters that cannot receive a gradient are decided from the config
  (training_loop.parameters_without_gradient), frozen, and DDP runs with find_unused_parameters=False. Without the
  freezing, DDP fails on the second step (so the check can fail).
- equality: the DDP gradient of two processes with B/2 samples each equals one process's gradient with all B
  samples (float64) for GradMem, RMT and the full-context LMs (llama, gpt2, pythia, mamba).
- no traffic inside WRITE: DDP's communication hook is never called during a forward (the inner per-sample
  gradients stay local to each process).
- the captured training step (fast_step.CapturedTrainStep, its eager code here) averages gradients and loss over the
  processes: its step on 2 processes equals one process's full-batch step.
- the shared trainer (training_experiment.run_experiment) on 2 processes: eval metrics computed on exactly the eval set
  (an odd number of samples: no duplicated or dropped sample at the end), equal to one process's; checkpoints
  written once (by the main process; RNG states once per process); resume with the same number of processes; a
  wall-clock budget (--max_train_minutes) stops every process at the same step.
Also (in the test process): the batch arithmetic of scripts/_launch.sh and its agreement with TrainArgs.validate.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
V, PAD = 24, 0
B = 4  # global batch of the gradient checks; each of the 2 processes takes B / 2 rows
GRADMEM_CASES = {  # name -> GradMem options (gpt2 backbone, float64)
    "second_paper": dict(grad_mode="second", K=2, use_write_head=True, add_inner_loss_to_outer=True,
                         inner_loss_weight=0.5),
    "second_last0_ctrl": dict(grad_mode="second", K=2, last_K_second_order=0, use_write_head=True, n_ctrl_tokens=1),
    "first_whead_ctrl": dict(grad_mode="first", K=2, use_write_head=True, n_ctrl_tokens=1),
    "first_lora_add": dict(grad_mode="first", K=1, use_write_lora=True, write_lora_r=2,
                           add_inner_loss_to_outer=True),
    "none_whead_per_sample": dict(grad_mode="none", K=2, use_write_head=True, use_mem_proj=True,
                                  mem_proj_mode="per_sample"),
    "none_add_ctrl_proj": dict(grad_mode="none", K=1, use_write_head=True, n_ctrl_tokens=1,
                               add_inner_loss_to_outer=True, use_mem_proj=True, mem_proj_mode="proj"),
    "second_lora_frozen": dict(grad_mode="second", K=2, use_write_lora=True, write_lora_r=2, freeze_backbone=True),
    "second_recompute": dict(grad_mode="second", K=2, use_write_head=True, add_inner_loss_to_outer=True,
                             inner_loss_weight=0.5, recompute_write=True),
}
RMT_CASES = {
    "rmt_preset": dict(K=1, mem_proj_mode="proj"),
    "rmt_rec_whead_residual_ctrl": dict(K=2, mem_proj_mode="proj_rw", use_reconstruction_loss=True,
                                        use_write_head=True, use_mem_residual=True, n_ctrl_tokens=1),
}
LM_CASES = ("llama", "gpt2", "pythia", "mamba")
TOLERANCE = {"gradmem": 1e-10, "rmt": 1e-10, "llama": 1e-6, "gpt2": 1e-10, "pythia": 1e-6, "mamba": 1e-6}
N_EVAL = 7  # odd: 2 processes x eval batch 2 leave a short, uneven last step


# ---------------------------------------------------------------------------------------------------------------
# worker (runs under torchrun, one copy per process)

def _gpt2_base():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, pad_token_id=PAD, eos_token_id=1, bos_token_id=2)


def _memory_batch(seed=0):
    """B right-padded rows, every row with real context (all written) and 2 labels (equal weight per row)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(3, V, (B, 7), generator=g)
    for i, n in enumerate((7, 4, 6, 5)):  # 11 real tokens in each half: token means agree
        context[i, n:] = PAD
    query = torch.randint(3, V, (B, 5), generator=g)
    labels = torch.full_like(query, -100)
    labels[:, 2:4] = query[:, 2:4]
    return {"context_input_ids": context, "query_input_ids": query, "labels": labels}


def _lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, 60, (B, 10), generator=g)
    labels = torch.full_like(input_ids, -100)
    labels[:, 6:9] = input_ids[:, 6:9]
    return {"input_ids": input_ids, "labels": labels}


def _build(kind, name):
    torch.manual_seed(0)
    if kind == "gradmem":
        from grad_memgpt import GradMemGPT, GradMemGPTConfig

        model = GradMemGPT(GradMemGPTConfig(base_config=_gpt2_base(), n_mem_tokens=2, lr=0.3,
                                            **GRADMEM_CASES[name]))
        with torch.no_grad():  # peft starts LoRA B at zero; make the adapters (and their gradients) generic
            for pname, param in model.named_parameters():
                if "lora_B" in pname:
                    param.normal_(0.0, 0.3)
    elif kind == "rmt":
        from rmt import RMT2Segm, RMT2SegmConfig

        model = RMT2Segm(RMT2SegmConfig(base_config=_gpt2_base(), n_mem_tokens=2, attn_implementation="eager",
                                        **RMT_CASES[name]))
    else:
        from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
        from tokenizers import Tokenizer, models

        from training_backbone import build_backbone_config

        vocab = {f"t{i}": i for i in range(64)}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t3")),
                                            pad_token="t0", eos_token="t1", bos_token="t2", unk_token="t3")
        config = build_backbone_config(name, n_layer=2, n_head=2, n_embd=32, tokenizer=tokenizer,
                                       max_position_embeddings=64)
        for attr in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # gpt2: no dropout, the halves must be exact
            if hasattr(config, attr):
                setattr(config, attr, 0.0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.double().train()


def _ddp_steps(model, batch, steps=2):
    """DDP (find_unused_parameters=False) forward/backward `steps` times on this process's rows; returns the
    averaged gradients of the first step and the comm-hook call counts (during forwards / in total)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, find_unused_parameters=False)
    calls = {"forward": 0, "total": 0}
    in_forward = [False]

    def counting_allreduce(state, bucket):
        calls["total"] += 1
        calls["forward"] += int(in_forward[0])
        return default_hooks.allreduce_hook(dist.group.WORLD, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    grads = None
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        in_forward[0] = True
        loss = ddp(**batch).loss
        in_forward[0] = False
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, calls


def _relative_error(grads, reference):
    diff = max(float((grads[n] - reference[n]).abs().max()) for n in reference)
    scale = max(float(g.abs().max()) for g in reference.values())
    return diff / scale


def _gradient_checks(rank, world):
    import training_loop

    results = {}
    cases = ([("gradmem", n) for n in GRADMEM_CASES] + [("rmt", n) for n in RMT_CASES]
             + [("lm", n) for n in LM_CASES])
    for kind, name in cases:
        batch = _memory_batch() if kind != "lm" else _lm_batch()
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}
        reference_model = _build(kind, name)
        reference_model(**batch).loss.backward()  # one process, all B rows, nothing frozen
        no_grad = sorted(n for n, p in reference_model.named_parameters() if p.requires_grad and p.grad is None)
        reference = {n: p.grad for n, p in reference_model.named_parameters() if p.grad is not None}
        model = _build(kind, name)
        frozen = sorted(training_loop.freeze_parameters_without_gradient(model))
        grads, calls = _ddp_steps(model, local)
        results[name] = {"kind": kind, "frozen": frozen, "no_grad_single_process": no_grad,
                         "rel_error": _relative_error(grads, reference), "same_params": sorted(grads) == sorted(reference),
                         "comm_calls": calls}
    # the failure that the freezing prevents: DDP without find_unused_parameters and a parameter without gradient
    try:
        _ddp_steps(_build("gradmem", "first_whead_ctrl"), {k: v.chunk(world)[rank] for k, v in _memory_batch().items()})
        results["unfrozen_error"] = None
    except RuntimeError as error:
        results["unfrozen_error"] = str(error)[:300]
    return results


def _captured_step_checks(rank, world):
    """fast_step.CapturedTrainStep (its eager, sync-free code; the CUDA graph needs a GPU) with the gradients averaged
    over the processes: one AdamW step of 2 processes with B/2 rows each equals one process's step with all B rows."""
    import torch.distributed as dist

    import training_loop
    from fast_step import CapturedTrainStep

    def step(model, rows, group):
        training_loop.freeze_parameters_without_gradient(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        out = CapturedTrainStep(model, optimizer, max_grad_norm=1.0, use_cuda_graph=False, process_group=group)(rows)
        return out, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    batch = _memory_batch()
    reference, reference_params = step(_build("gradmem", "second_paper"), batch, None)
    out, params = step(_build("gradmem", "second_paper"), {k: v.chunk(world)[rank] for k, v in batch.items()},
                       dist.group.WORLD)
    return {"param_rel_error": _relative_error(params, reference_params),
            "loss": float(out.loss), "loss_reference": float(reference.loss),
            "grad_norm": float(out.grad_norm), "grad_norm_reference": float(reference.grad_norm)}


def _trainer_checks(rank, world, work_dir: Path):
    """training_experiment.run_experiment on 2 processes: eval on exactly the eval set, checkpoints, resume."""
    import numpy as np
    from transformers import TrainerCallback

    import kv_dataset_utils
    import training_args
    import training_backbone
    import training_collators
    import training_experiment
    from grad_memgpt import GradMemGPT, GradMemGPTConfig

    tokenizer = training_backbone.load_tokenizer(
        training_args.BackboneArgs(tokenizer_path=str(REPO / "tokenizers/kv_alphabet_62")))
    spec = kv_dataset_utils.parse_dataset_name("N2-K2V2-V62")
    splits = kv_dataset_utils.build_kv_dataset_dict(spec, n_train=8, n_valid=N_EVAL, seed=0)
    collator = training_collators.MemoryModelCollator(tokenizer)
    base_metrics = training_collators.make_compute_metrics(tokenizer)
    seen = []

    def compute_metrics(eval_pred):  # what the trainer gathered from both processes
        predictions = eval_pred.predictions
        predictions = predictions[0] if isinstance(predictions, (tuple, list)) else predictions
        seen.append((np.asarray(eval_pred.label_ids).tolist(), np.asarray(predictions).tolist()))
        return base_metrics(eval_pred)

    def model():
        torch.manual_seed(0)
        base = training_backbone.build_backbone_config("llama", n_layer=2, n_head=2, n_embd=32, tokenizer=tokenizer,
                                                       max_position_embeddings=128)
        # grad_mode first without the inner loss: the write head cannot get a gradient and must be frozen
        return GradMemGPT(GradMemGPTConfig(base_config=base, n_mem_tokens=2, K=1, lr=0.1, grad_mode="first",
                                           use_write_head=True))

    def train_args(max_steps):
        return training_args.TrainArgs(
            exp_path=str(work_dir / "run"), per_device_batch_size=2, per_device_eval_batch_size=2,
            total_batch_size=2 * world, max_steps=max_steps, eval_steps=1, logging_steps=1, warmup_steps=0,
            learning_rate=1e-3, report_to="tensorboard", dataloader_num_workers=0, use_cpu=True,
            early_stopping_patience=0, stop_metric_value=None, seed=1)

    class RecordTrainLogs(TrainerCallback):
        records = []
        find_unused_parameters = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.find_unused_parameters.append((args.ddp_find_unused_parameters, args.ddp_broadcast_buffers))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                self.records.append({k: v for k, v in logs.items() if k not in ("learning_rate", "epoch")})

    first = train_args(2)
    first.validate()  # the batch identity with WORLD_SIZE from torchrun
    trained = model()
    metrics = training_experiment.run_experiment(first, trained, tokenizer, splits, collator, compute_metrics,
                                                 data_name="kv", extra_callbacks=[RecordTrainLogs()])
    train_logs = [None] * world
    torch.distributed.all_gather_object(train_logs, RecordTrainLogs.records)
    evaluations = list(seen)
    # the same (best) model evaluated by this process alone on the whole eval set
    trained.eval()
    full = collator([splits["valid"][i] for i in range(N_EVAL)])
    with torch.no_grad():
        logits = trained(full["context_input_ids"], full["query_input_ids"]).logits
    predictions = training_collators.reduce_logits_to_predictions(logits, full["labels"])
    predictions = predictions[0] if isinstance(predictions, tuple) else predictions
    run_dir = work_dir / "run"
    files = {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}
    config = json.loads((run_dir / "run_config.json").read_text())

    resumed = training_experiment.run_experiment(train_args(3), model(), tokenizer, splits, collator, compute_metrics,
                                                 data_name="kv")
    resumed_config = json.loads((run_dir / "run_config.json").read_text())
    eval_rows = [len(labels) for labels, _ in seen]
    # a wall-clock budget already spent at the first step: every process stops there (the main one decides)
    timed_args = train_args(9)
    timed_args.max_train_minutes = 1e-9
    timed = training_experiment.run_experiment(timed_args, model(), tokenizer, splits, collator, compute_metrics,
                                               data_name="kv")
    timed_steps = [None] * world
    torch.distributed.all_gather_object(timed_steps, timed["global_step"])
    return {
        "eval_rows": eval_rows,
        "timed_global_steps": timed_steps,
        "train_logs": train_logs,  # per process
        "find_unused_parameters": RecordTrainLogs.find_unused_parameters,
        # (labels, predictions) of the best model right after training (evaluations at start, steps 1 and 2, then the
        # best model, then the final checkpoint), gathered from 2 processes
        "final_eval": evaluations[3],
        "single_process_eval": (full["labels"].tolist(), predictions.tolist()),
        "files": sorted(files),
        "num_processes": config["num_processes"],
        "write_head_trainable": any(p.requires_grad for p in trained.write_head.parameters()),
        "first_global_step": metrics["global_step"],
        "resumed_global_step": resumed["global_step"],
        "resumed_from": resumed_config["resumed_from"],
    }


def worker(out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"world_size": world, "gradients": _gradient_checks(rank, world),
              "captured_step": _captured_step_checks(rank, world)}
    report["trainer"] = _trainer_checks(rank, world, Path(out_path).parent)
    if rank == 0:
        Path(out_path).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(sys.argv[1])


# ---------------------------------------------------------------------------------------------------------------
# tests (in the pytest process)

@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "report.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(Path(__file__).resolve()), str(out)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_two_processes_ran(report):
    assert report["world_size"] == 2


@pytest.mark.parametrize("name", list(GRADMEM_CASES) + list(RMT_CASES) + list(LM_CASES))
def test_ddp_gradient_equals_one_process_full_batch(report, name):
    result = report["gradients"][name]
    kind = result["kind"] if result["kind"] != "lm" else name
    assert result["same_params"]
    assert result["rel_error"] <= TOLERANCE[kind], result["rel_error"]


@pytest.mark.parametrize("name", list(GRADMEM_CASES) + list(RMT_CASES) + list(LM_CASES))
def test_frozen_parameters_are_exactly_those_without_gradient(report, name):
    result = report["gradients"][name]
    assert result["frozen"] == result["no_grad_single_process"]


def test_frozen_sets_per_gradient_mode(report):
    frozen = {name: set(report["gradients"][name]["frozen"]) for name in GRADMEM_CASES}
    assert frozen["second_paper"] == set()
    assert frozen["second_last0_ctrl"] == {"write_head.weight", "write_start", "write_end"}
    assert frozen["first_whead_ctrl"] == {"write_head.weight", "write_start", "write_end"}
    assert frozen["first_lora_add"] == set()
    assert frozen["none_whead_per_sample"] == {"mem", "write_head.weight", "mem_proj.weight", "mem_proj.bias"}
    assert frozen["none_add_ctrl_proj"] == {"mem"}
    assert frozen["second_lora_frozen"] == set()
    for name in list(RMT_CASES) + list(LM_CASES):
        assert report["gradients"][name]["frozen"] == []


def test_without_freezing_ddp_fails(report):
    error = report["gradients"]["unfrozen_error"]
    assert error is not None and "reduction" in error


def test_captured_step_averages_over_processes(report):
    """fast_step's all-reduce: two processes with half the rows each take one process's full-batch step."""
    r = report["captured_step"]
    assert r["param_rel_error"] < 1e-12
    assert r["loss"] == pytest.approx(r["loss_reference"], rel=1e-12)
    assert r["grad_norm"] == pytest.approx(r["grad_norm_reference"], rel=1e-12)


def test_no_communication_inside_write(report):
    for name in GRADMEM_CASES:
        calls = report["gradients"][name]["comm_calls"]
        assert calls["forward"] == 0 and calls["total"] > 0


def test_eval_metrics_on_exactly_the_eval_set(report):
    trainer = report["trainer"]
    # first run: at start, steps 1 and 2, best model, final checkpoint; resumed: step 3, best, final checkpoint
    assert len(trainer["eval_rows"]) == 8
    assert all(rows == N_EVAL for rows in trainer["eval_rows"])
    labels, predictions = trainer["final_eval"]
    expected_labels, expected_predictions = trainer["single_process_eval"]
    assert labels == expected_labels  # every sample once, in order
    assert predictions == expected_predictions


def test_train_logs_are_the_same_on_every_process(report):
    """Model stats (inner loss, memory norms, ...) are reduced over the processes before logging, like the loss."""
    logs = report["trainer"]["train_logs"]
    assert len(logs[0]) == 2 and {"loss", "inner_loss", "target_loss", "mem_norm_max"} <= set(logs[0][0])
    assert logs[0] == logs[1]


def test_checkpoints_written_once_and_resume(report):
    trainer = report["trainer"]
    files = set(trainer["files"])
    assert trainer["num_processes"] == 2 and not trainer["write_head_trainable"]
    assert trainer["find_unused_parameters"] == [[False, False]]  # DDP options: no unused-parameter search, no
    # buffer broadcast before every forward
    assert {"checkpoint-2/model.safetensors", "checkpoint-2/optimizer.pt", "checkpoint-2/trainer_state.json",
            "checkpoint-2/rng_state_0.pth", "checkpoint-2/rng_state_1.pth", "run_config.json", "config.json"} <= files
    assert not any("rng_state_2" in f for f in files)
    writers = {f.rsplit(".", 2)[-2] for f in files if "tfevents" in f}  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert len(writers) == 1  # tensorboard events from one process (the main one; pid in the file name)
    assert trainer["first_global_step"] == 2 and trainer["resumed_global_step"] == 3
    assert trainer["resumed_from"].endswith("checkpoint-2")
    assert trainer["timed_global_steps"] == [4, 4]  # --max_train_minutes: one step past the resumed step 3, together


# ---------------------------------------------------------------------------------------------------------------
# batch arithmetic of the presets (scripts/_launch.sh) and the Python check

def launch_setup(**env):
    script = 'source scripts/_launch.sh && launch_setup && echo "$PER_DEVICE_BATCH $GRAD_ACC ${LAUNCH[*]}"'
    clean = {k: v for k, v in os.environ.items() if k not in ("NP", "TBS", "PER_DEVICE", "NUM_MACHINES",
                                                              "MACHINE_RANK", "MAIN_PROCESS_IP")}
    clean["CUDA_VISIBLE_DEVICES"] = "0,1,2,3,4,5,6,7"
    clean.update({k: str(v) for k, v in env.items()})
    return subprocess.run(["bash", "-c", script], cwd=REPO, env=clean, capture_output=True, text=True)


@pytest.mark.parametrize("np_, tbs, per_device, expected", [
    (1, 64, 64, (64, 1)), (2, 64, 64, (32, 1)), (4, 64, 64, (16, 1)), (8, 64, 64, (8, 1)),
    (1, 64, 16, (16, 4)), (2, 64, 16, (16, 2)), (4, 256, 64, (64, 1)), (1, 64, 48, (32, 2)), (1, 10, 4, (2, 5)),
])
def test_launch_arithmetic(np_, tbs, per_device, expected):
    done = launch_setup(NP=np_, TBS=tbs, PER_DEVICE=per_device)
    assert done.returncode == 0, done.stderr
    per_device_batch, grad_acc, *launch = done.stdout.split()
    assert (int(per_device_batch), int(grad_acc)) == expected
    assert int(per_device_batch) <= per_device and int(per_device_batch) * np_ * int(grad_acc) == tbs
    config = "accelerate.yaml" if np_ == 1 else "accelerate_ddp.yaml"
    assert launch[:6] == ["accelerate", "launch", "--config_file", config, "--num_processes", str(np_)]
    # the run scripts' Python check accepts what the presets derive
    import training_args

    args = training_args.TrainArgs(per_device_batch_size=int(per_device_batch),
                                   gradient_accumulation_steps=int(grad_acc), total_batch_size=tbs)
    os.environ["WORLD_SIZE"], saved = str(np_), os.environ.get("WORLD_SIZE")
    try:
        args.validate()
    finally:
        os.environ.pop("WORLD_SIZE") if saved is None else os.environ.__setitem__("WORLD_SIZE", saved)


def test_launch_multi_machine():
    done = launch_setup(NP=16, TBS=256, PER_DEVICE=64, NUM_MACHINES=2, MACHINE_RANK=1, MAIN_PROCESS_IP="10.0.0.1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:2] == ["16", "1"]
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 10.0.0.1" in done.stdout


@pytest.mark.parametrize("env, message", [
    (dict(NP=3, TBS=64, PER_DEVICE=64), "not divisible by NP=3"),
    (dict(NP=0, TBS=64, PER_DEVICE=64), "NP=0 must be a positive integer"),
    (dict(NP=2, TBS=64, PER_DEVICE="x"), "PER_DEVICE=x must be a positive integer"),
    (dict(NP=3, TBS=48, PER_DEVICE=64, NUM_MACHINES=2), "do not split evenly"),
    (dict(NP=4, TBS=64, PER_DEVICE=64, NUM_MACHINES=2), "needs MAIN_PROCESS_IP"),
    (dict(NP=4, TBS=64, PER_DEVICE=64, NUM_MACHINES=2, MACHINE_RANK=2, MAIN_PROCESS_IP="h"), "MACHINE_RANK=2"),
])
def test_launch_errors(env, message):
    done = launch_setup(**env)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_launch_warns_about_missing_gpus():
    done = launch_setup(NP=16, TBS=64, PER_DEVICE=64)
    assert done.returncode == 0 and "warning: NP=16 over 1 machine(s) needs 16 GPUs per machine, this one shows 8" \
        in done.stderr


def test_python_check_names_the_fix(monkeypatch):
    import training_args

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="set --gradient_accumulation_steps 2"):
        training_args.TrainArgs(per_device_batch_size=16, gradient_accumulation_steps=1, total_batch_size=64).validate()


def test_resume_needs_the_same_number_of_processes(tmp_path):
    import training_run_folder

    config = tmp_path / "run_config.json"
    config.write_text(json.dumps({"cli_args": {"seed": 1}, "num_processes": 2}))
    training_run_folder._check_resumable(config, {"seed": 1}, num_processes=2)
    with pytest.raises(ValueError, match="trained with 2 processes and is resumed with 1.*NP=2"):
        training_run_folder._check_resumable(config, {"seed": 1}, num_processes=1)


def test_a_model_with_nothing_to_train_is_an_error():
    import training_loop
    from grad_memgpt import GradMemGPT, GradMemGPTConfig

    torch.manual_seed(0)
    sys.path.insert(0, str(REPO))
    model = GradMemGPT(GradMemGPTConfig(base_config=_gpt2_base(), n_mem_tokens=2, grad_mode="none", K=1,
                                        use_write_head=True, freeze_backbone=True))
    assert sorted(training_loop.parameters_without_gradient(model)) == ["mem", "write_head.weight"]
    with pytest.raises(ValueError, match="no parameter of this model can receive a gradient"):
        training_loop.freeze_parameters_without_gradient(model)
