#!/usr/bin/env bash
# The paper's central claims on KV retrieval, each run limited by a wall-clock budget:
#   - main comparison, seeds SEEDS: GradMem (8 memory vectors, K=2 second order) vs RMT (8 memory vectors, one
#     forward write) vs the full-context Llama, on N4, N8 and N16;
#   - K ablation: GradMem K=1 and K=5 at N8 and N16, seeds SEEDS_ABLATION (K=2 is the main run);
#   - grad_mode ablation: GradMem grad_mode none and first at N8, seeds SEEDS_ABLATION (second is the main run).
# All on Llama L4 H4 D128 from scratch with the first-stage recipe of run_kv_capacity.sh: batch 64, AdamW lr 1e-3,
# constant after a linear warmup of 300 steps (100 when warm-started), clip 1.0, eval every EVAL_STEPS steps on
# MAX_EVAL_SAMPLES held-out samples, no early stopping, stop at eval exact match 0.99, else at the first evaluation
# after BUDGET_N<n> minutes of training (--max_train_minutes). Runs at N16 (and N32) warm-start (--init_checkpoint)
# from the best checkpoint of the same model and seed at N8 (N16), as the authors reached larger N; N4 and N8 start
# from scratch. The numbers reported are all_results.json's: the best checkpoint's eval metrics.
#
#   bash scripts/run_paper_claims.sh                       # everything on GPU 0, one run after the other
#   GPUS="0 1 2 3" bash scripts/run_paper_claims.sh        # one process per GPU, budgets balanced over the GPUs
#   DRY_RUN=1 GPUS="1 2 3" bash scripts/run_paper_claims.sh   # print the plan and the commands, run nothing
#   ONLY="gradmem rmt" NS="8 16" SEEDS=1 RUNS_DIR=runs/paper_claims_smoke RESULTS_DIR=/tmp/smoke \
#       bash scripts/run_paper_claims.sh --max_steps 20   # a smoke test (its own folders: done runs are skipped)
#
# Environment (defaults in brackets):
#   GPUS ["0"]  SEEDS ["1 2"]  SEEDS_ABLATION ["1"]  NS ["4 8 16"] (any of 4 8 16 32; 16 needs 8, 32 needs 16)
#   ONLY ["gradmem rmt llama k_ablation grad_mode"]   BUDGET_N4 [1] BUDGET_N8 [2] BUDGET_N16 [3] BUDGET_N32 [4]
#   EVAL_STEPS [200]  MAX_EVAL_SAMPLES [500]  MAX_STEPS [1000000]  PRECISION [fp32] (fp32 | tf32 | bf16)
#   DATA_DIR [./data]  DATA_SIZE [1M]  N_VALID [5000]  N_TEST [2000]  RUNS_DIR [runs/paper_claims]  RESULTS_DIR [results/paper_claims]
#   PYTHON [python3]  DRY_RUN [empty]
# Seed s uses --seed 142+s, so run folders are RUNS_DIR/<data>/<run_name>/run_<142+s> (the run scripts' names).
# Extra arguments go to every run (they override the preset's). Logs: RUNS_DIR/logs/<run id>.log. Missing datasets
# DATA_DIR/N<n>-K2V2-V62_<DATA_SIZE> are built first (kv_dataset_utils.py). A run whose folder holds
# all_results.json is skipped; an unfinished one resumes (its budget counts again from the restart). A failed run
# is reported and its warm-started dependants are skipped; the others go on, and the script exits 1 at the end.
# Finally: collect_results.py --runs RUNS_DIR --out RESULTS_DIR --copy_metrics RESULTS_DIR/runs.
set -euo pipefail
cd "$(dirname "$0")/.."

GPUS=${GPUS:-0}
SEEDS=${SEEDS:-"1 2"}
SEEDS_ABLATION=${SEEDS_ABLATION:-1}
NS=${NS:-"4 8 16"}
ONLY=${ONLY:-"gradmem rmt llama k_ablation grad_mode"}
BUDGET_N4=${BUDGET_N4:-1}
BUDGET_N8=${BUDGET_N8:-2}
BUDGET_N16=${BUDGET_N16:-3}
BUDGET_N32=${BUDGET_N32:-4}
EVAL_STEPS=${EVAL_STEPS:-200}
MAX_EVAL_SAMPLES=${MAX_EVAL_SAMPLES:-500}
MAX_STEPS=${MAX_STEPS:-1000000}
PRECISION=${PRECISION:-fp32}
DATA_DIR=${DATA_DIR:-./data}
DATA_SIZE=${DATA_SIZE:-1M}
N_TEST=${N_TEST:-2000}
N_VALID=${N_VALID:-5000}
RUNS_DIR=${RUNS_DIR:-runs/paper_claims}
RESULTS_DIR=${RESULTS_DIR:-results/paper_claims}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-}
LR=1e-3
WARMUP=300       # from scratch
INIT_WARMUP=100  # warm-started
STOP_EM=0.99

fail() {
    echo "run_paper_claims: $*" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------------------------
# Check the settings before any work
# ---------------------------------------------------------------------------------------------------------------

is_positive_number() { [[ "$1" =~ ^[0-9]*\.?[0-9]+$ ]] && awk -v x="$1" 'BEGIN { exit !(x > 0) }'; }
has_word() { [[ " $1 " == *" $2 "* ]]; }

read -r -a GPU_LIST <<< "$GPUS"
(( ${#GPU_LIST[@]} > 0 )) || fail "GPUS is empty; list GPU indices separated by spaces, e.g. GPUS=\"0 1 2\""
for gpu in "${GPU_LIST[@]}"; do
    [[ "$gpu" =~ ^[A-Za-z0-9:-]+$ ]] || fail "GPUS=\"$GPUS\": '$gpu' is not a GPU index (separate GPUs by spaces)"
done
[ "$(printf '%s\n' "${GPU_LIST[@]}" | sort | uniq -d)" = "" ] || fail "GPUS=\"$GPUS\" names a GPU twice"
for seed in $SEEDS $SEEDS_ABLATION; do
    [[ "$seed" =~ ^[0-9]+$ ]] || fail "SEEDS=\"$SEEDS\" / SEEDS_ABLATION=\"$SEEDS_ABLATION\": '$seed' is not a number"
done
for n in $NS; do
    case "$n" in 4|8|16|32) ;; *) fail "NS=\"$NS\": N=$n is not one of 4 8 16 32" ;; esac
done
has_word "$NS" 16 && ! has_word "$NS" 8 && fail "NS=\"$NS\": N16 runs warm-start from the N8 runs; add 8"
has_word "$NS" 32 && ! has_word "$NS" 16 && fail "NS=\"$NS\": N32 runs warm-start from the N16 runs; add 16"
for part in $ONLY; do
    case "$part" in gradmem|rmt|llama|k_ablation|grad_mode) ;;
        *) fail "ONLY=\"$ONLY\": '$part' is not one of gradmem rmt llama k_ablation grad_mode" ;; esac
done
for name in BUDGET_N4 BUDGET_N8 BUDGET_N16 BUDGET_N32; do
    is_positive_number "${!name}" || fail "$name=${!name} must be a positive number of minutes"
done
for name in EVAL_STEPS MAX_EVAL_SAMPLES MAX_STEPS N_VALID N_TEST; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name=${!name} must be a positive integer"
done
[[ "$DATA_SIZE" =~ ^[1-9][0-9]*[KM]?$ ]] || fail "DATA_SIZE=$DATA_SIZE must look like 1M, 100K or 5000"
case "$PRECISION" in
    fp32) PRECISION_ARGS=(--fp32) ;;
    tf32) PRECISION_ARGS=(--fp32 --tf32) ;;
    bf16) PRECISION_ARGS=(--bf16) ;;
    *) fail "PRECISION must be fp32, tf32 or bf16, got $PRECISION" ;;
esac
EXTRA_ARGS=("$@")

# ---------------------------------------------------------------------------------------------------------------
# The runs: R_* arrays indexed by run number; a job is one run or a warm-start chain (N8 -> N16 -> N32)
# ---------------------------------------------------------------------------------------------------------------

R_ID=(); R_N=(); R_MODEL=(); R_SEED=(); R_BUDGET=(); R_PARENT=()
J_RUNS=(); J_COST=()  # run numbers of the job (in order); summed budget in thousandths of a minute

budget_of() { local name="BUDGET_N$1"; echo "${!name}"; }
milli() { awk -v x="$1" 'BEGIN { printf "%d", x * 1000 + 0.5 }'; }
minutes() { awk -v x="$1" 'BEGIN { printf "%g", x / 1000 }'; }

add_run() {  # model n seed parent -> appends a run, its number in LAST_RUN
    LAST_RUN=${#R_ID[@]}
    R_ID+=("N$2_$1_s$3"); R_N+=("$2"); R_MODEL+=("$1"); R_SEED+=("$3"); R_BUDGET+=("$(budget_of "$2")")
    R_PARENT+=("$4")
}

add_job() {  # run numbers of one job
    local cost=0 i
    for i in "$@"; do cost=$(( cost + $(milli "${R_BUDGET[$i]}") )); done
    J_RUNS+=("$*"); J_COST+=("$cost")
}

add_family() {  # model, seeds, the N it runs at: N4 alone, N8 -> N16 -> N32 as one chain per seed
    local model=$1 seeds=$2 ns=$3 seed n parent chain
    for seed in $seeds; do
        if has_word "$ns" 4; then add_run "$model" 4 "$seed" -1; add_job "$LAST_RUN"; fi
        parent=-1; chain=()
        for n in 8 16 32; do
            has_word "$ns" "$n" || continue
            add_run "$model" "$n" "$seed" "$parent"
            parent=$LAST_RUN; chain+=("$LAST_RUN")
        done
        if (( ${#chain[@]} > 0 )); then add_job "${chain[@]}"; fi
    done
}

ns_among() { local n out=""; for n in $NS; do has_word "$*" "$n" && out+="$n "; done; echo "$out"; }

for part in $ONLY; do
    case "$part" in
        gradmem|rmt|llama) add_family "$part" "$SEEDS" "$NS" ;;
        k_ablation) for K in 1 5; do add_family "gradmem_K$K" "$SEEDS_ABLATION" "$(ns_among 8 16)"; done ;;
        grad_mode) for mode in none first; do add_family "gradmem_grad_$mode" "$SEEDS_ABLATION" "$(ns_among 8)"; done ;;
    esac
done
(( ${#R_ID[@]} > 0 )) || fail "ONLY=\"$ONLY\" with NS=\"$NS\" leaves no run (the ablations run at N8/N16 only)"

# ---- longest job first onto the GPU with the least summed budget so far (the first such GPU on ties) ----
G_JOBS=(); G_LOAD=()
for g in "${!GPU_LIST[@]}"; do G_JOBS+=(""); G_LOAD+=(0); done
for j in $(for j in "${!J_COST[@]}"; do echo "${J_COST[$j]} $j"; done | sort -s -k1,1nr | cut -d' ' -f2); do
    best=0
    for g in "${!GPU_LIST[@]}"; do (( G_LOAD[g] < G_LOAD[best] )) && best=$g; done
    G_JOBS[best]+="$j "; G_LOAD[best]=$(( G_LOAD[best] + J_COST[j] ))
done

# ---------------------------------------------------------------------------------------------------------------
# The command of each run
# ---------------------------------------------------------------------------------------------------------------

data_path() { echo "$DATA_DIR/N$1-K2V2-V62_$DATA_SIZE"; }

GRADMEM_ARGS=(--preset paper_kv --attn_implementation auto)  # the paper's KV model (grad_memgpt.PRESETS)

run_command() {  # run number, init checkpoint ("" = from scratch) -> CMD array
    local i=$1 init=$2 model=${R_MODEL[$1]} warmup=$WARMUP
    case "$model" in
        gradmem) CMD=(run_gradmemgpt_on_kv_retrieval.py "${GRADMEM_ARGS[@]}" --K 2 --grad_mode second) ;;
        gradmem_K*) CMD=(run_gradmemgpt_on_kv_retrieval.py "${GRADMEM_ARGS[@]}" --K "${model#gradmem_K}" --grad_mode second) ;;
        gradmem_grad_*) CMD=(run_gradmemgpt_on_kv_retrieval.py "${GRADMEM_ARGS[@]}" --K 2 --grad_mode "${model#gradmem_grad_}") ;;
        rmt) CMD=(run_rmt_on_kv_retrieval.py --n_mem_tokens 8 --K 1 --n_ctrl_tokens 0 --use_mem_proj --mem_proj_mode proj
                  --attn_implementation sdpa) ;;
        llama) CMD=(run_gpt2_on_kv_retrieval.py --max_position_embeddings 1024) ;;
        *) fail "internal: unknown model $model" ;;
    esac
    if (( R_PARENT[i] >= 0 )); then warmup=$INIT_WARMUP; fi
    CMD+=(--data_path "$(data_path "${R_N[$i]}")" --runs_dir "$RUNS_DIR"
          --base_model llama --n_layer 4 --n_head 4 --n_embd 128 --tokenizer_path ./tokenizers/kv_alphabet_62/
          --per_device_batch_size 64 --learning_rate "$LR" --lr_scheduler_type constant_with_warmup
          --warmup_steps "$warmup" --max_steps "$MAX_STEPS" --max_grad_norm 1.0
          --eval_steps "$EVAL_STEPS" --logging_steps "$EVAL_STEPS" --max_eval_samples "$MAX_EVAL_SAMPLES"
          --early_stopping_patience 0 --stop_metric exact_match --stop_metric_value "$STOP_EM"
          --max_train_minutes "${R_BUDGET[$i]}" --seed $(( 142 + R_SEED[i] )) "${PRECISION_ARGS[@]}")
    if [ -n "$init" ]; then CMD+=(--init_checkpoint "$init"); fi
    CMD+=("${EXTRA_ARGS[@]}")
}

# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------

print_plan() {
    local g j i order total=0
    echo "plan: ${#R_ID[@]} runs in ${#J_RUNS[@]} jobs on ${#GPU_LIST[@]} GPU(s); budgets (minutes of training):" \
         "N4 $BUDGET_N4, N8 $BUDGET_N8, N16 $BUDGET_N16, N32 $BUDGET_N32; precision $PRECISION"
    printf '%-5s %-5s %-4s %-20s %-5s %-7s %s\n' gpu order N model seed budget "init from"
    for g in "${!GPU_LIST[@]}"; do
        order=0
        for j in ${G_JOBS[g]}; do
            for i in ${J_RUNS[j]}; do
                order=$(( order + 1 ))
                init=-
                if (( R_PARENT[i] >= 0 )); then init="best checkpoint of ${R_ID[${R_PARENT[$i]}]}"; fi
                printf '%-5s %-5s %-4s %-20s %-5s %-7s %s\n' "${GPU_LIST[g]}" "$order" "${R_N[$i]}" "${R_MODEL[$i]}" \
                    "${R_SEED[$i]}" "${R_BUDGET[$i]}" "$init"
            done
        done
    done
    for g in "${!GPU_LIST[@]}"; do
        echo "gpu ${GPU_LIST[g]}: $(minutes "${G_LOAD[g]}") min of training budget"
        total=$(( total + G_LOAD[g] ))
    done
    echo "total: $(minutes "$total") min of training budget (startup, evaluations and the final evaluation come on top)"
}

print_plan
if [ -n "$DRY_RUN" ]; then
    echo "commands (run id: command; extra arguments included):"
    for i in "${!R_ID[@]}"; do
        init=""
        if (( R_PARENT[i] >= 0 )); then init="<best checkpoint of ${R_ID[${R_PARENT[$i]}]}>"; fi
        run_command "$i" "$init"
        echo "${R_ID[$i]}: $PYTHON $(printf '%q ' "${CMD[@]}")"
    done
    for n in $NS; do
        [ -d "$(data_path "$n")" ] || echo "would build $(data_path "$n")"
    done
    exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
# Data, run folders, then one worker per GPU
# ---------------------------------------------------------------------------------------------------------------

USED_NS=$(printf '%s\n' "${R_N[@]}" | sort -n -u)
for n in $USED_NS; do
    if [ ! -d "$(data_path "$n")" ]; then
        "$PYTHON" kv_dataset_utils.py --name "N$n-K2V2-V62_$DATA_SIZE" --out "$(data_path "$n")" --n_valid "$N_VALID" --n_test "$N_TEST"
    fi
done

# The run folder of every run, named as the run scripts name it (checks every command's options, too).
RESOLVE_RUN_DIRS='
import shlex, sys
from pathlib import Path

from full_context_lm import FullContextArgs
from grad_memgpt import PRESETS, GradMemArgs
from rmt import RMTArgs
from training_runs import full_context_run_name, gradmem_run_name, rmt_run_name
from training_args import BackboneArgs, DataArgs, TrainArgs, parse_cli
from training_run_folder import resolve_run_dir

NAMING = {"run_gradmemgpt_on_kv_retrieval.py": (GradMemArgs, gradmem_run_name, PRESETS),
          "run_rmt_on_kv_retrieval.py": (RMTArgs, rmt_run_name, None),
          "run_gpt2_on_kv_retrieval.py": (FullContextArgs, full_context_run_name, None)}
for line in sys.stdin:
    script, *args = shlex.split(line)
    model_args, run_name, presets = NAMING[script]
    train, backbone, model, data = parse_cli(TrainArgs, BackboneArgs, model_args, DataArgs, args=args, presets=presets)
    if train.run_name is None:
        train.run_name = run_name(train, backbone, model, 1)
    print(resolve_run_dir(train, Path(data.data_path.rstrip("/")).name))
'
mkdir -p "$RUNS_DIR/logs"
mapfile -t R_DIR < <(for i in "${!R_ID[@]}"; do
    run_command "$i" "$( (( R_PARENT[i] >= 0 )) && echo placeholder-init || true)"
    printf '%q ' "${CMD[@]}"; echo
done | "$PYTHON" -c "$RESOLVE_RUN_DIRS")
(( ${#R_DIR[@]} == ${#R_ID[@]} )) || fail "could not name the run folders (see the error above)"
duplicates=$(printf '%s\n' "${R_DIR[@]}" | sort | uniq -d)
[ -z "$duplicates" ] || fail "two runs of the plan would share a run folder: $duplicates"

best_checkpoint() {  # run folder -> best_model_checkpoint of its all_results.json ("" if none)
    "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1])).get('best_model_checkpoint') or '')" \
        "$1/all_results.json"
}

run_job_list() {  # GPU position: run its jobs one after the other; status 1 if a run failed or was skipped
    local g=$1 gpu=${GPU_LIST[$1]} j i init log bad=0 status
    local -A FAILED=()
    export CUDA_VISIBLE_DEVICES=$gpu
    for j in ${G_JOBS[g]}; do
        for i in ${J_RUNS[j]}; do
            log="$RUNS_DIR/logs/${R_ID[$i]}.log"
            if [ -f "${R_DIR[$i]}/all_results.json" ]; then
                echo "[gpu $gpu] ${R_ID[$i]}: done before (${R_DIR[$i]}/all_results.json), skipped"
                continue
            fi
            init=""
            if (( R_PARENT[i] >= 0 )); then
                if [ -n "${FAILED[${R_PARENT[$i]}]:-}" ]; then
                    echo "[gpu $gpu] ${R_ID[$i]}: SKIPPED, its warm start ${R_ID[${R_PARENT[$i]}]} failed"
                    FAILED[$i]=1; bad=$(( bad + 1 )); continue
                fi
                init=$(best_checkpoint "${R_DIR[${R_PARENT[$i]}]}") || init=""
                if [ -z "$init" ]; then
                    echo "[gpu $gpu] ${R_ID[$i]}: SKIPPED, ${R_DIR[${R_PARENT[$i]}]} has no best checkpoint to start from"
                    FAILED[$i]=1; bad=$(( bad + 1 )); continue
                fi
            fi
            run_command "$i" "$init"
            echo "[gpu $gpu] $(date '+%F %T') ${R_ID[$i]}: start (${R_BUDGET[$i]} min) -> ${R_DIR[$i]}, log $log"
            echo "$(date '+%F %T') CUDA_VISIBLE_DEVICES=$gpu $PYTHON $(printf '%q ' "${CMD[@]}")" >> "$log"
            status=0
            "$PYTHON" "${CMD[@]}" >> "$log" 2>&1 || status=$?
            if (( status != 0 )) || [ ! -f "${R_DIR[$i]}/all_results.json" ]; then
                echo "[gpu $gpu] $(date '+%F %T') ${R_ID[$i]}: FAILED (exit $status), see $log"
                FAILED[$i]=1; bad=$(( bad + 1 ))
            else
                echo "[gpu $gpu] $(date '+%F %T') ${R_ID[$i]}: finished, eval exact match" \
                     "$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['eval_exact_match'])" \
                        "${R_DIR[$i]}/all_results.json")"
            fi
        done
    done
    (( bad == 0 ))
}

WORKERS=()
for g in "${!GPU_LIST[@]}"; do
    [ -n "${G_JOBS[g]}" ] || continue
    run_job_list "$g" &
    WORKERS+=("$!")
done
N_BAD=0  # GPUs with a failed or skipped run (+1 if collecting the results fails)
for pid in "${WORKERS[@]}"; do
    wait "$pid" || N_BAD=$(( N_BAD + 1 ))
done

if ! "$PYTHON" collect_results.py --runs "$RUNS_DIR" --out "$RESULTS_DIR" --copy_metrics "$RESULTS_DIR/runs"; then
    echo "run_paper_claims: collect_results.py failed (see above)" >&2
    N_BAD=$(( N_BAD + 1 ))
fi
if (( N_BAD > 0 )); then
    echo "run_paper_claims: some runs failed or were skipped (see the FAILED / SKIPPED lines above)" >&2
    exit 1
fi
echo "run_paper_claims: all ${#R_ID[@]} runs done; results in $RESULTS_DIR"
