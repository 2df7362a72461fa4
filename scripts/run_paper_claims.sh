#!/usr/bin/env bash
# The paper's central claims on KV retrieval as a fair comparison matrix: every family gets the same number of
# optimizer steps at each N, its own learning-rate sweep, the same seeds, the same warm-start rules, the same
# selection (valid exact match) and the same final test (answers generated greedily on the separate test split).
#
# Families, all on Llama L4 H4 D128 from scratch (Mamba: 4 layers, width 128) and K2V2-V62 data at N4, N8, N16, N32:
#   gradmem  GradMem, `--preset paper_kv` (8 memory vectors, second order, write head, inner loss x0.5, outer AdamW lr
#            GRADMEM_LR_K<k> for each K): K inner SGD steps of WRITE; the sweep is the inner lr (GRADMEM_ILRS_K<k>).
#            K=5 has outer lr 1e-4: at 1e-3 (K=1 and K=2's) every inner lr of its sweep diverged at N8.
#   rmt      RMT (run_rmt_on_kv_retrieval.py), 8 memory vectors, write-side memory projection (mem_proj_mode proj), the
#            reconstruction loss (weight RMT_REC_WEIGHT) with its own write head, sdpa attention. K is rmt.py's: K
#            forward writes of the context, write k > 1 starting from the memory written by write k - 1 (the context is
#            read K times; the reconstruction loss is averaged over the K writes). Sweep: the outer lr, RMT_LRS, with
#            warmup RMT_WARMUP (the original RMT recipe: lr 1e-4, warmup 2000).
#   llama    the full-context Llama (run_gpt2_on_kv_retrieval.py), 1024 positions, plain RoPE: reads the whole context
#            (no memory, no K). Sweep: the lr, LLAMA_LRS (the full-context reference recipe's 5e-5, and the larger lrs
#            swept for RMT), AdamW beta2 LLAMA_BETA2 (the reference recipe's 0.98).
#            The upper bound, trained until its valid exact match stops improving: up to LLAMA_STEPS_FACTOR times the
#            step budget, stopped after LLAMA_PATIENCE evaluations without a better one (LLAMA_STEPS_FACTOR=1
#            LLAMA_PATIENCE=0: the same budget as every other family).
#   mamba    the full-context Mamba (run_gpt2_on_kv_retrieval.py --base_model mamba; training_backbone's local
#            config, no K). Sweep: the lr, MAMBA_LRS (around 3e-4, what scripts/run_gpt_on_kv_retrieval.sh gives).
# A cell is (family, K, swept lr, N); each cell runs once per seed in SEEDS.
#
# Two phases (SWEEP_SEEDS set): the lr sweeps run on fewer seeds. Phase 1 runs every lr of each sweep (a family and K
# with more than one lr) on the seeds of SWEEP_SEEDS only, the cells of a single lr (llama, mamba) on every seed.
# Then, per (family, K, N), the lr with the best valid exact match of phase 1 (the selected checkpoint's
# eval_exact_match in all_results.json, the mean over the sweep seeds; ties: the smaller lr; no test metric is read;
# results_matrix.lr_sweep_choice, the collector's rule) is written with the whole sweep to RESULTS_DIR/lr_choice.md
# and lr_choice.json, and phase 2 runs it on the other seeds of SEEDS. The lr is chosen at each N from that N's
# phase-1 runs, as the collector chooses per N, so every N has its own tuned lr (the best inner lr may change with
# N, and a warm start changes the run); a phase-2 run at N16 (N32) warm-starts from the run of the same lr and seed at
# N8 (N16), which phase 2 runs as well (its plan names it "warm start only" where N8 chose another lr), so every seed
# of a chosen cell has the same history. Choosing once at the smallest N would save those runs and the sweep at the
# larger N, but would leave N16 and N32 untuned. A sweep with a phase-1 run that failed, was skipped or has no valid
# exact match chooses nothing: its phase 2 is skipped (reported, exit 1 at the end). DRY_RUN prints phase 1's plan and
# what phase 2 will run; where phase-1 results are on disk (RUNS_DIR), the choice and phase 2's concrete plan too.
# Runs, phase 1 + phase 2 (DRY_RUN counts, default sweeps, SWEEP_SEEDS=1): NS=8 27 + 16 instead of 81; NS="8 16"
# 54 + 32 (up to 48 where N16 chooses another lr than N8) instead of 162; all four N 108 + 64 (up to 112) vs 324.
#
# Every run: batch 64, clip 1.0, AdamW, lr constant after its family's warmup (INIT_WARMUP steps when warm-started, for
# every family), exactly STEPS_N<n> optimizer steps (no wall-clock budget, no early stopping, no stop at a metric value;
# llama: the upper bound's budget above), evaluation every EVAL_STEPS steps on MAX_EVAL_SAMPLES valid samples with the
# best checkpoint selected on valid exact match, the trainer's guards as they default (spike skipping, collapse
# rollback). After training every run evaluates the selected checkpoint and, where it differs, the final one on valid
# and on the TEST split (N_TEST samples of their own random stream), teacher-forced and with generated answers:
# all_results.json holds test_generated_exact_match and final_test_generated_exact_match for every family. Runs at N16
# (N32) warm-start (--init_checkpoint) from the selected checkpoint of the same cell and seed at N8 (N16); N4 and N8
# start from scratch.
#
#   DRY_RUN=1 GPUS="0 1 2 3" bash scripts/run_paper_claims.sh   # the plan and every command; runs nothing
#   GPUS="0 1 2 3" PRECISION=tf32 bash scripts/run_paper_claims.sh              # the whole matrix
#   ONLY=rmt K=2 LRS=3e-4 NS="8" SEEDS=1 bash scripts/run_paper_claims.sh       # one cell, one seed
#   ONLY="llama mamba" NS="8 16" bash scripts/run_paper_claims.sh               # some families, N8 -> N16
#   ONLY=gradmem K=5 RUNS_DIR=/tmp/smoke RESULTS_DIR=/tmp/smoke_results bash scripts/run_paper_claims.sh --max_steps 20
#   SWEEP_SEEDS=1 GPUS="0 1" NS="8 16" PRECISION=tf32 bash scripts/run_paper_claims.sh  # sweeps on seed 1, then the
#                                                                 # best-valid lr of each (family, K, N) on seeds 2 3
#
# Selection (which cells run):
#   ONLY ["gradmem rmt llama mamba"]   families
#   K ["1 2 5"]       WRITE steps (gradmem) / forward writes (rmt); llama and mamba have none
#   LRS [unset]       replaces the swept lrs of every selected family (gradmem: inner lr; the others: outer lr)
#   NS ["4 8 16 32"]  16 needs 8, 32 needs 16 (warm starts)     SEEDS ["1 2 3"]: seed s runs with --seed 142+s
#   SWEEP_SEEDS [unset]  two phases: the seeds of SEEDS that run every lr of a sweep; the others run the lr chosen
#                        on them (unset: every lr on every seed)
# Budgets, the same for every family:
#   STEPS_N4 [5000]  STEPS_N8 [10000]  STEPS_N16 [20000]  STEPS_N32 [40000]   optimizer steps of each run at that N
#   INIT_WARMUP [100]  warmup steps of every warm-started run
#   but the full-context Llama's (the upper bound): LLAMA_STEPS_FACTOR [3] x those steps at most, LLAMA_PATIENCE [5]
#   evaluations without a better valid exact match end it (0: never)
# Each family's recipe:
#   GRADMEM_LR_K1 [1e-3]  GRADMEM_LR_K2 [1e-3]  GRADMEM_LR_K5 [1e-4]  GRADMEM_WARMUP [300]  GRADMEM_BETA2 [0.999]
#   GRADMEM_ILRS_K1 ["0.04 0.08 0.16 0.32 0.8"]  GRADMEM_ILRS_K2 ["0.02 0.04 0.08"]  GRADMEM_ILRS_K5 ["0.04 0.08 0.3 2.0"]
#       (another K needs its GRADMEM_LR_K<k> and GRADMEM_ILRS_K<k>)
#   RMT_LRS ["1e-4 3e-4 1e-3"]  RMT_WARMUP [2000]  RMT_BETA2 [0.999]  RMT_REC_WEIGHT [0.5] (GradMem's inner-loss weight)
#   LLAMA_LRS ["5e-5 3e-4 1e-3"]  LLAMA_WARMUP [2000]  LLAMA_BETA2 [0.98]
#   MAMBA_LRS ["1e-4 3e-4 1e-3"]  MAMBA_WARMUP [2000]  MAMBA_BETA2 [0.999]
# The rest:
#   GPUS ["0"] (one worker per GPU, warm-start chains stay on one GPU, jobs balanced by estimated cost)
#   WORKERS_PER_GPU [1]  workers (runs at once) on each GPU, named <gpu>/<w> in the plan: small models leave a GPU
#                        mostly idle (three language-task runs on one H200: 49 ms per GradMem step, 24 ms per LM step,
#                        against 21 ms each alone)
#   EVAL_STEPS [500]  MAX_EVAL_SAMPLES [1000]  PRECISION [fp32] (fp32 | tf32 | bf16)
#   DATA_DIR [./data]  DATA_SIZE [1M]  N_VALID [5000]  N_TEST [2000]
#   RUNS_DIR [runs/kv_matrix]  RESULTS_DIR [results/kv_matrix]  PYTHON [python3]  DRY_RUN [unset]
#
# Run folders are the run scripts' own: RUNS_DIR/<data>/<run_name>/run_<142+s>; the saved arguments (run_config.json)
# say which cell a run belongs to (collect_results.py reads them). Extra arguments go to every run and win over the
# preset's. Logs: RUNS_DIR/logs/<run id>.log. Missing datasets DATA_DIR/N<n>-K2V2-V62_<DATA_SIZE> are built first. A
# run whose all_results.json exists and whose record asks for the planned --max_steps is skipped (where some are, the
# workers are balanced again on the runs left to do, and that plan printed); any other run is started with its
# command, which resumes an unfinished run folder (or continues a finished one to a larger --max_steps). A failed run
# is reported and its warm-started dependants are skipped; the others go on and the script exits 1 at the end.
# Finally: collect_results.py --runs RUNS_DIR --out RESULTS_DIR --copy_metrics RESULTS_DIR/runs.
# Those copied metrics, put into RUNS_DIR on another machine, make its sitting skip the runs they hold; a warm start
# whose parent came that way (metrics, no checkpoint) is skipped with the fix named: chain N8 -> N16 in one sitting.
# Balancing cost of a run (an estimate, for the GPU assignment only): steps x (2K+1) for gradmem, x (K+1) for rmt, x 1
# for llama and mamba.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "run_paper_claims: $*" >&2
    exit 2
}

# Settings of earlier versions: refused, so that an old command line does not silently run the new matrix
for name in BUDGET_N4 BUDGET_N8 BUDGET_N16 BUDGET_N32 SEEDS_ABLATION MAX_STEPS GRADMEM_LR; do
    if [ -n "${!name+set}" ]; then
        case "$name" in
            BUDGET_*) fail "$name is no longer read: every run has a step budget, the same for every family; set" \
                           "STEPS_${name#BUDGET_} (optimizer steps) and unset $name" ;;
            SEEDS_ABLATION) fail "SEEDS_ABLATION is no longer read: every cell (K=1, 2, 5 included) runs the seeds of" \
                                 "SEEDS; unset SEEDS_ABLATION" ;;
            MAX_STEPS) fail "MAX_STEPS is no longer read: set STEPS_N4 ... STEPS_N32 (or pass --max_steps as an extra" \
                            "argument for a smoke test); unset MAX_STEPS" ;;
            GRADMEM_LR) fail "GRADMEM_LR is no longer read: each K has its own outer lr, GRADMEM_LR_K<k> (defaults:" \
                             "K1, K2 1e-3, K5 1e-4); set those and unset GRADMEM_LR" ;;
        esac
    fi
done

GPUS=${GPUS:-0}
WORKERS_PER_GPU=${WORKERS_PER_GPU:-1}
ONLY=${ONLY:-"gradmem rmt llama mamba"}
K=${K:-"1 2 5"}
LRS=${LRS:-}
NS=${NS:-"4 8 16 32"}
SEEDS=${SEEDS:-"1 2 3"}
TWO_PHASE=${SWEEP_SEEDS+set}  # SWEEP_SEEDS set (even empty, refused below): the two-phase protocol
SWEEP_SEEDS=${SWEEP_SEEDS-}
STEPS_N4=${STEPS_N4:-5000}
STEPS_N8=${STEPS_N8:-10000}
STEPS_N16=${STEPS_N16:-20000}
STEPS_N32=${STEPS_N32:-40000}
INIT_WARMUP=${INIT_WARMUP:-100}
GRADMEM_LR_K1=${GRADMEM_LR_K1:-1e-3}
GRADMEM_LR_K2=${GRADMEM_LR_K2:-1e-3}
GRADMEM_LR_K5=${GRADMEM_LR_K5:-1e-4}
GRADMEM_WARMUP=${GRADMEM_WARMUP:-300}
GRADMEM_BETA2=${GRADMEM_BETA2:-0.999}
GRADMEM_ILRS_K1=${GRADMEM_ILRS_K1:-"0.04 0.08 0.16 0.32 0.8"}
GRADMEM_ILRS_K2=${GRADMEM_ILRS_K2:-"0.02 0.04 0.08"}
GRADMEM_ILRS_K5=${GRADMEM_ILRS_K5:-"0.04 0.08 0.3 2.0"}
RMT_LRS=${RMT_LRS:-"1e-4 3e-4 1e-3"}
RMT_WARMUP=${RMT_WARMUP:-2000}
RMT_BETA2=${RMT_BETA2:-0.999}
RMT_REC_WEIGHT=${RMT_REC_WEIGHT:-0.5}
LLAMA_LRS=${LLAMA_LRS:-"5e-5 3e-4 1e-3"}
LLAMA_WARMUP=${LLAMA_WARMUP:-2000}
LLAMA_BETA2=${LLAMA_BETA2:-0.98}
LLAMA_STEPS_FACTOR=${LLAMA_STEPS_FACTOR:-3}
LLAMA_PATIENCE=${LLAMA_PATIENCE:-5}
MAMBA_LRS=${MAMBA_LRS:-"1e-4 3e-4 1e-3"}
MAMBA_WARMUP=${MAMBA_WARMUP:-2000}
MAMBA_BETA2=${MAMBA_BETA2:-0.999}
EVAL_STEPS=${EVAL_STEPS:-500}
MAX_EVAL_SAMPLES=${MAX_EVAL_SAMPLES:-1000}
PRECISION=${PRECISION:-fp32}
DATA_DIR=${DATA_DIR:-./data}
DATA_SIZE=${DATA_SIZE:-1M}
N_VALID=${N_VALID:-5000}
N_TEST=${N_TEST:-2000}
RUNS_DIR=${RUNS_DIR:-runs/kv_matrix}
RESULTS_DIR=${RESULTS_DIR:-results/kv_matrix}
PYTHON=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-}

# ---------------------------------------------------------------------------------------------------------------
# Check the settings before any work
# ---------------------------------------------------------------------------------------------------------------

is_number() { [[ "$1" =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]]; }
is_positive_number() { is_number "$1" && awk -v x="$1" 'BEGIN { exit !(x > 0) }'; }
has_word() { [[ " $1 " == *" $2 "* ]]; }
no_repeats() {  # variable name: fail if its list names a value twice
    local repeated
    repeated=$(tr ' ' '\n' <<< "${!1}" | grep . | sort | uniq -d | head -n 1)
    [ -z "$repeated" ] || fail "$1=\"${!1}\" names $repeated twice; list each value once"
}
check_lr_list() {  # variable name, what: a non-empty list of positive numbers
    local lr
    [ -n "${!1// /}" ] || fail "$1 is empty; list the $2 to sweep, e.g. $1=\"1e-4 3e-4\""
    for lr in ${!1}; do
        is_positive_number "$lr" || fail "$1=\"${!1}\": '$lr' is not a positive number ($2)"
    done
    no_repeats "$1"
}

read -r -a GPU_LIST <<< "$GPUS"
(( ${#GPU_LIST[@]} > 0 )) || fail "GPUS is empty; list GPU indices separated by spaces, e.g. GPUS=\"0 1 2\""
for gpu in "${GPU_LIST[@]}"; do
    [[ "$gpu" =~ ^[A-Za-z0-9:-]+$ ]] || fail "GPUS=\"$GPUS\": '$gpu' is not a GPU index (separate GPUs by spaces)"
done
[ "$(printf '%s\n' "${GPU_LIST[@]}" | sort | uniq -d)" = "" ] || fail "GPUS=\"$GPUS\" names a GPU twice"
[[ "$WORKERS_PER_GPU" =~ ^[1-9][0-9]*$ ]] \
    || fail "WORKERS_PER_GPU=$WORKERS_PER_GPU must be a positive integer (runs at once on each GPU)"
WORKER_GPU=(); WORKER_NAME=()  # one worker per GPU, or WORKERS_PER_GPU of them named <gpu>/<w>
for gpu in "${GPU_LIST[@]}"; do
    for (( w = 1; w <= WORKERS_PER_GPU; w++ )); do
        WORKER_GPU+=("$gpu")
        if (( WORKERS_PER_GPU == 1 )); then WORKER_NAME+=("$gpu"); else WORKER_NAME+=("$gpu/$w"); fi
    done
done
[ -n "${ONLY// /}" ] || fail "ONLY is empty; name the families to run, e.g. ONLY=\"gradmem rmt\""
for family in $ONLY; do
    case "$family" in gradmem|rmt|llama|mamba) ;;
        *) fail "ONLY=\"$ONLY\": '$family' is not one of gradmem rmt llama mamba" ;; esac
done
no_repeats ONLY
[ -n "${SEEDS// /}" ] || fail "SEEDS is empty; list the seeds, e.g. SEEDS=\"1 2 3\""
for seed in $SEEDS; do
    [[ "$seed" =~ ^[0-9]+$ ]] || fail "SEEDS=\"$SEEDS\": '$seed' is not a number (seed s runs with --seed 142+s)"
done
no_repeats SEEDS
OTHER_SEEDS=""  # two phases: the seeds of SEEDS that run only the chosen lr
if [ -n "$TWO_PHASE" ]; then
    [ -n "${SWEEP_SEEDS// /}" ] || fail "SWEEP_SEEDS is empty; name the seeds of SEEDS that run every lr of a sweep," \
        "e.g. SWEEP_SEEDS=${SEEDS%% *} (or unset SWEEP_SEEDS: every lr on every seed)"
    for seed in $SWEEP_SEEDS; do
        [[ "$seed" =~ ^[0-9]+$ ]] || fail "SWEEP_SEEDS=\"$SWEEP_SEEDS\": '$seed' is not a number; name seeds of" \
            "SEEDS=\"$SEEDS\", e.g. SWEEP_SEEDS=${SEEDS%% *}"
        has_word "$SEEDS" "$seed" || fail "SWEEP_SEEDS=\"$SWEEP_SEEDS\": seed $seed is not in SEEDS=\"$SEEDS\";" \
            "name seeds of SEEDS (the sweep runs on them, the chosen lr on the others), e.g. SWEEP_SEEDS=${SEEDS%% *}"
    done
    no_repeats SWEEP_SEEDS
    for seed in $SEEDS; do has_word "$SWEEP_SEEDS" "$seed" || OTHER_SEEDS+="${OTHER_SEEDS:+ }$seed"; done
fi
[ -n "${NS// /}" ] || fail "NS is empty; list the N to run, e.g. NS=\"4 8 16 32\""
for n in $NS; do
    case "$n" in 4|8|16|32) ;; *) fail "NS=\"$NS\": N=$n is not one of 4 8 16 32" ;; esac
done
no_repeats NS
has_word "$NS" 16 && ! has_word "$NS" 8 && fail "NS=\"$NS\": N16 runs warm-start from the N8 runs of their cell; add 8"
has_word "$NS" 32 && ! has_word "$NS" 16 && fail "NS=\"$NS\": N32 runs warm-start from the N16 runs of their cell;" \
    "add 16"
if has_word "$ONLY" gradmem || has_word "$ONLY" rmt; then
    [ -n "${K// /}" ] || fail "K is empty; list the WRITE steps to run, e.g. K=\"1 2 5\""
    for k in $K; do
        [[ "$k" =~ ^[1-9][0-9]*$ ]] || fail "K=\"$K\": '$k' is not a positive integer (WRITE steps)"
    done
    no_repeats K
fi
if [ -n "$LRS" ]; then
    check_lr_list LRS "learning rates (gradmem: inner lr; rmt, llama, mamba: outer lr)"
elif has_word "$ONLY" gradmem; then
    for k in $K; do
        name="GRADMEM_ILRS_K$k"
        [ -n "${!name:-}" ] || fail "$name is not set: GradMem K=$k needs its inner-lr sweep, e.g." \
                                    "$name=\"0.02 0.04 0.08\" (or LRS=\"0.04\" for every selected family)"
        check_lr_list "$name" "inner learning rates of GradMem K=$k"
    done
fi
if has_word "$ONLY" gradmem; then
    for k in $K; do
        name="GRADMEM_LR_K$k"
        is_positive_number "${!name:-}" || fail "$name=${!name:-} must be a positive number: GradMem K=$k needs its" \
                                               "outer (AdamW) lr, e.g. $name=1e-3"
    done
fi
for name in RMT_LRS LLAMA_LRS MAMBA_LRS; do
    family=${name%_LRS}; family=${family,,}
    if [ -z "$LRS" ] && has_word "$ONLY" "$family"; then check_lr_list "$name" "learning rates of $family"; fi
done
for name in STEPS_N4 STEPS_N8 STEPS_N16 STEPS_N32 EVAL_STEPS MAX_EVAL_SAMPLES N_VALID N_TEST LLAMA_STEPS_FACTOR; do
    [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || fail "$name=${!name} must be a positive integer"
done
[[ "$LLAMA_PATIENCE" =~ ^[0-9]+$ ]] \
    || fail "LLAMA_PATIENCE=$LLAMA_PATIENCE must be a number of evaluations (an integer >= 0; 0: no early stop)"
for name in INIT_WARMUP GRADMEM_WARMUP RMT_WARMUP LLAMA_WARMUP MAMBA_WARMUP; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || fail "$name=${!name} must be a number of steps (an integer >= 0)"
done
for name in RMT_REC_WEIGHT; do
    is_positive_number "${!name}" || fail "$name=${!name} must be a positive number"
done
for name in GRADMEM_BETA2 RMT_BETA2 LLAMA_BETA2 MAMBA_BETA2; do
    is_number "${!name}" && awk -v x="${!name}" 'BEGIN { exit !(x >= 0 && x < 1) }' \
        || fail "$name=${!name} must be an AdamW beta2 in [0, 1), e.g. 0.999"
done
[[ "$DATA_SIZE" =~ ^[1-9][0-9]*[KM]?$ ]] || fail "DATA_SIZE=$DATA_SIZE must look like 1M, 100K or 5000"
source scripts/_launch.sh && precision_args "$PRECISION"  # PRECISION_ARGS
EXTRA_ARGS=("$@")

# ---------------------------------------------------------------------------------------------------------------
# The cells and runs: R_* arrays indexed by run number; a job is one run or a warm-start chain (N8 -> N16 -> N32)
# ---------------------------------------------------------------------------------------------------------------

C_NAME=(); C_FAMILY=(); C_K=(); C_LR=()  # cells without N: family, K ("" = none), the swept lr
C_SWEEP=()  # the cell's sweep (family and K: gradmem_K2, llama), whose cells differ only in the swept lr
add_cell() {  # family K lr
    local name=$1
    if [ -n "$2" ]; then name+="_K$2"; fi
    C_SWEEP+=("$name")
    if [ "$1" = gradmem ]; then name+="_ilr$3"; else name+="_lr$3"; fi
    C_NAME+=("$name"); C_FAMILY+=("$1"); C_K+=("$2"); C_LR+=("$3")
}
for family in gradmem rmt llama mamba; do  # a fixed order, whatever the order of ONLY
    has_word "$ONLY" "$family" || continue
    case "$family" in
        gradmem) for k in $K; do
                     name="GRADMEM_ILRS_K$k"
                     for lr in ${LRS:-${!name}}; do add_cell gradmem "$k" "$lr"; done
                 done ;;
        rmt) for k in $K; do for lr in ${LRS:-$RMT_LRS}; do add_cell rmt "$k" "$lr"; done; done ;;
        llama) for lr in ${LRS:-$LLAMA_LRS}; do add_cell llama "" "$lr"; done ;;
        mamba) for lr in ${LRS:-$MAMBA_LRS}; do add_cell mamba "" "$lr"; done ;;
    esac
done

declare -A SWEEP_SIZE=()  # sweep -> its number of lrs
for c in "${!C_NAME[@]}"; do SWEEP_SIZE[${C_SWEEP[$c]}]=$(( ${SWEEP_SIZE[${C_SWEEP[$c]}]:-0} + 1 )); done
is_swept() {  # cell: its sweep has more than one lr and two phases split it by seed
    [ -n "$TWO_PHASE" ] && (( SWEEP_SIZE[${C_SWEEP[$1]}] > 1 ))
}

# The plan of one phase (one phase = the whole matrix without SWEEP_SEEDS): R_* per run, J_* per job, G_* per GPU
reset_plan() {
    R_ID=(); R_CELL=(); R_N=(); R_SEED=(); R_PARENT=()
    J_RUNS=(); J_COST=()  # run numbers of the job (in order); estimated cost (steps x cost factor of the family)
}

steps_of() { local name="STEPS_N$1"; echo "${!name}"; }
cell_steps() {  # cell number, N -> the --max_steps of its runs at that N (llama, the upper bound: LLAMA_STEPS_FACTOR x)
    if [ "${C_FAMILY[$1]}" = llama ]; then echo $(( $(steps_of "$2") * LLAMA_STEPS_FACTOR )); else steps_of "$2"; fi
}
run_steps() { cell_steps "${R_CELL[$1]}" "${R_N[$1]}"; }  # run number -> its --max_steps
cost_factor() {  # cell number -> relative cost of one step (balancing only)
    case "${C_FAMILY[$1]}" in
        gradmem) echo $(( 2 * C_K[$1] + 1 )) ;;
        rmt) echo $(( C_K[$1] + 1 )) ;;
        *) echo 1 ;;
    esac
}
run_cost() { echo $(( $(run_steps "$1") * $(cost_factor "${R_CELL[$1]}") )); }  # run number -> its balancing cost

add_run() {  # cell n seed parent -> appends a run, its number in LAST_RUN
    LAST_RUN=${#R_ID[@]}
    R_ID+=("N$2_${C_NAME[$1]}_s$3"); R_CELL+=("$1"); R_N+=("$2"); R_SEED+=("$3"); R_PARENT+=("$4")
}

add_job() {  # run numbers of one job
    local cost=0 i
    for i in "$@"; do cost=$(( cost + $(run_cost "$i") )); done
    J_RUNS+=("$*"); J_COST+=("$cost")
}

add_n4_job() {  # cell seed: its N4 run alone, if NS has 4
    if has_word "$NS" 4; then add_run "$1" 4 "$2" -1; add_job "$LAST_RUN"; fi
}

add_chain_job() {  # cell seed top: the chain N8 -> N16 -> N32 of the cell and seed, the N of NS up to top
    local parent=-1 n chain=()
    for n in 8 16 32; do
        (( n <= $3 )) || break
        has_word "$NS" "$n" || continue
        add_run "$1" "$n" "$2" "$parent"
        parent=$LAST_RUN; chain+=("$LAST_RUN")
    done
    if (( ${#chain[@]} > 0 )); then add_job "${chain[@]}"; fi
}

plan_phase1() {  # every cell on every seed; two phases: a swept cell on the seeds of SWEEP_SEEDS only
    local c seed seeds
    reset_plan
    for c in "${!C_NAME[@]}"; do  # N4 alone; N8 -> N16 -> N32 as one chain per cell and seed
        seeds=$SEEDS
        if is_swept "$c"; then seeds=$SWEEP_SEEDS; fi
        for seed in $seeds; do add_n4_job "$c" "$seed"; add_chain_job "$c" "$seed" 32; done
    done
}

declare -A CHOSEN=()  # "sweep N" -> the cell of the lr chosen at that N in phase 1 (absent: no choice)
plan_phase2() {  # at each N the chosen cell on the other seeds, with the runs of that cell its warm starts need
    local c seed n top
    reset_plan
    for c in "${!C_NAME[@]}"; do
        is_swept "$c" || continue
        for seed in $OTHER_SEEDS; do
            if [ "${CHOSEN[${C_SWEEP[$c]} 4]:-}" = "$c" ]; then add_n4_job "$c" "$seed"; fi
            top=0
            for n in 8 16 32; do
                if [ "${CHOSEN[${C_SWEEP[$c]} $n]:-}" = "$c" ]; then top=$n; fi
            done
            if (( top > 0 )); then add_chain_job "$c" "$seed" "$top"; fi
        done
    done
}

assign_gpus() {  # the costliest job first onto the GPU with the least summed cost so far (the first such GPU on ties)
    local g j best
    G_JOBS=(); G_LOAD=()
    for g in "${!WORKER_GPU[@]}"; do G_JOBS+=(""); G_LOAD+=(0); done
    for j in $(for j in "${!J_COST[@]}"; do echo "${J_COST[$j]} $j"; done | sort -s -k1,1nr | cut -d' ' -f2); do
        best=0
        for g in "${!WORKER_GPU[@]}"; do (( G_LOAD[g] < G_LOAD[best] )) && best=$g; done
        G_JOBS[best]+="$j "; G_LOAD[best]=$(( G_LOAD[best] + J_COST[j] ))
    done
}

# ---------------------------------------------------------------------------------------------------------------
# The command of each run
# ---------------------------------------------------------------------------------------------------------------

data_path() { echo "$DATA_DIR/N$1-K2V2-V62_$DATA_SIZE"; }

run_command() {  # run number, init checkpoint ("" = from scratch) -> CMD array
    local i=$1 init=$2 c=${R_CELL[$1]} warmup beta2 lr patience=0
    local k=${C_K[$c]}
    case "${C_FAMILY[$c]}" in
        gradmem) CMD=(run_gradmemgpt_on_kv_retrieval.py --preset paper_kv --attn_implementation auto --K "$k"
                      --inner_lr "${C_LR[$c]}")
                 lr=GRADMEM_LR_K$k; lr=${!lr}; warmup=$GRADMEM_WARMUP; beta2=$GRADMEM_BETA2 ;;
        rmt) CMD=(run_rmt_on_kv_retrieval.py --n_mem_tokens 8 --K "$k" --n_ctrl_tokens 0 --mem_proj_mode proj
                  --use_reconstruction_loss --reconstruction_loss_weight "$RMT_REC_WEIGHT" --use_write_head
                  --attn_implementation sdpa)
             lr=${C_LR[$c]}; warmup=$RMT_WARMUP; beta2=$RMT_BETA2 ;;
        llama) CMD=(run_gpt2_on_kv_retrieval.py --base_model llama --max_position_embeddings 1024)
               lr=${C_LR[$c]}; warmup=$LLAMA_WARMUP; beta2=$LLAMA_BETA2; patience=$LLAMA_PATIENCE ;;
        mamba) CMD=(run_gpt2_on_kv_retrieval.py --base_model mamba)
               lr=${C_LR[$c]}; warmup=$MAMBA_WARMUP; beta2=$MAMBA_BETA2 ;;
        *) fail "internal: unknown family ${C_FAMILY[$c]}" ;;
    esac
    if [ "${C_FAMILY[$c]}" = gradmem ] || [ "${C_FAMILY[$c]}" = rmt ]; then CMD+=(--base_model llama); fi
    if (( R_PARENT[i] >= 0 )); then warmup=$INIT_WARMUP; fi
    CMD+=(--data_path "$(data_path "${R_N[$i]}")" --runs_dir "$RUNS_DIR"
          --n_layer 4 --n_head 4 --n_embd 128 --tokenizer_path ./tokenizers/kv_alphabet_62/
          --per_device_batch_size 64 --learning_rate "$lr" --adam_beta2 "$beta2"
          --lr_scheduler_type constant_with_warmup --warmup_steps "$warmup" --max_steps "$(run_steps "$i")"
          --max_grad_norm 1.0 --eval_steps "$EVAL_STEPS" --logging_steps "$EVAL_STEPS"
          --max_eval_samples "$MAX_EVAL_SAMPLES" --metric_for_best_model exact_match
          --early_stopping_patience "$patience"
          --stop_metric_value None --seed $(( 142 + R_SEED[i] )) "${PRECISION_ARGS[@]}")
    if [ -n "$init" ]; then CMD+=(--init_checkpoint "$init"); fi
    CMD+=("${EXTRA_ARGS[@]}")
}

# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------

print_plan() {  # title, what the runs are
    local g j i order total=0 init
    echo "$1: ${#R_ID[@]} runs ($2) in ${#J_RUNS[@]} jobs on" \
         "${#GPU_LIST[@]} GPU(s) x $WORKERS_PER_GPU worker(s); optimizer steps per run, every family:" \
         "N4 $STEPS_N4, N8 $STEPS_N8, N16 $STEPS_N16," \
         "N32 $STEPS_N32 (llama: up to x$LLAMA_STEPS_FACTOR, early stop after $LLAMA_PATIENCE evaluations" \
         "without a better valid exact match; 0: none); precision $PRECISION"
    printf '%-5s %-5s %-4s %-28s %-5s %-7s %s\n' gpu order N cell seed steps "init from"
    for g in "${!WORKER_GPU[@]}"; do
        order=0
        for j in ${G_JOBS[g]}; do
            for i in ${J_RUNS[j]}; do
                order=$(( order + 1 ))
                init=-
                if (( R_PARENT[i] >= 0 )); then init="best checkpoint of ${R_ID[${R_PARENT[$i]}]}"; fi
                printf '%-5s %-5s %-4s %-28s %-5s %-7s %s\n' "${WORKER_NAME[g]}" "$order" "${R_N[$i]}" \
                    "${C_NAME[${R_CELL[$i]}]}" "${R_SEED[$i]}" "$(run_steps "$i")" "$init"
            done
        done
    done
    for g in "${!WORKER_GPU[@]}"; do
        echo "gpu ${WORKER_NAME[g]}: cost ${G_LOAD[g]} (steps x family cost factor)"
        total=$(( total + G_LOAD[g] ))
    done
    echo "total cost: $total (gradmem: steps x (2K+1), rmt: steps x (K+1), llama, mamba: steps; for balancing only)"
}

print_commands() {
    local i init
    echo "commands (run id: command; extra arguments included):"
    for i in "${!R_ID[@]}"; do
        init=""
        if (( R_PARENT[i] >= 0 )); then init="<best checkpoint of ${R_ID[${R_PARENT[$i]}]}>"; fi
        run_command "$i" "$init"
        echo "${R_ID[$i]}: $PYTHON $(printf '%q ' "${CMD[@]}")"
    done
}

N_SWEEPS=0  # sweeps with more than one lr, split by seed when there are two phases
for sweep in "${!SWEEP_SIZE[@]}"; do if (( SWEEP_SIZE[$sweep] > 1 )); then N_SWEEPS=$(( N_SWEEPS + 1 )); fi; done

print_phase1() {
    if [ -z "$TWO_PHASE" ]; then
        print_plan plan "${#C_NAME[@]} cells x N in {$NS} x seeds {$SEEDS}"
    else
        print_plan "plan, phase 1 of 2 (the lr sweeps)" "every lr of the $N_SWEEPS sweeps with more than one lr on\
 the sweep seeds {$SWEEP_SEEDS}, the cells of a single lr on seeds {$SEEDS}; N in {$NS}"
    fi
}

describe_phase2() {  # what phase 2 runs, before its lrs are chosen
    local seeds n4=0 m=0 n c runs most cost=0 sweep
    local -A counted=()
    read -r -a seeds <<< "$OTHER_SEEDS"
    if (( N_SWEEPS == 0 )); then
        echo "plan, phase 2 of 2: no runs (no sweep has more than one lr)"
        return
    elif (( ${#seeds[@]} == 0 )); then
        echo "plan, phase 2 of 2: no runs (SWEEP_SEEDS names every seed of SEEDS); after phase 1 each sweep's" \
             "choice still goes to $RESULTS_DIR/lr_choice.md and lr_choice.json"
        return
    fi
    if has_word "$NS" 4; then n4=1; fi
    for n in 8 16 32; do if has_word "$NS" "$n"; then m=$(( m + 1 )); fi; done
    runs=$(( N_SWEEPS * ${#seeds[@]} * (n4 + m) ))
    most=$(( N_SWEEPS * ${#seeds[@]} * (n4 + m * (m + 1) / 2) ))
    for c in "${!C_NAME[@]}"; do  # one lr per sweep and N: the cost does not depend on which
        sweep=${C_SWEEP[$c]}
        if ! is_swept "$c" || [ -n "${counted[$sweep]:-}" ]; then continue; fi
        counted[$sweep]=1
        for n in $NS; do cost=$(( cost + ${#seeds[@]} * $(cell_steps "$c" "$n") * $(cost_factor "$c") )); done
    done
    echo "plan, phase 2 of 2 (after phase 1): for each (family, K, N) of the $N_SWEEPS sweeps, the lr with the best" \
         "valid exact match in phase 1 (the selected checkpoint's eval_exact_match in all_results.json, the mean over" \
         "the sweep seeds; ties: the smaller lr; no test metric is read) runs on seeds {$OTHER_SEEDS}; an N16 (N32)" \
         "run warm-starts from the N8 (N16) run of the same lr and seed, run in phase 2 as well: $runs runs (cost" \
         "$cost) where a sweep chooses the same lr at every N$( (( most > runs )) && echo ", up to $most where each N" \
         "chooses another"); the choice goes to $RESULTS_DIR/lr_choice.md and lr_choice.json"
}

print_phase2() {  # the concrete phase-2 plan (CHOSEN), with the runs that are only warm starts named
    local i c
    print_plan "plan, phase 2 of 2 (the chosen lrs)" "at each N the lr chosen in phase 1, on seeds {$OTHER_SEEDS}"
    for i in "${!R_ID[@]}"; do
        c=${R_CELL[$i]}
        if [ "${CHOSEN[${C_SWEEP[$c]} ${R_N[$i]}]:-}" != "$c" ]; then
            echo "warm start only: ${R_ID[$i]}, for the same lr chosen at a larger N (N${R_N[$i]} chose" \
                 "$(if [ -n "${CHOSEN[${C_SWEEP[$c]} ${R_N[$i]}]:-}" ]; then
                        echo "${C_LR[${CHOSEN[${C_SWEEP[$c]} ${R_N[$i]}]}]}"; else echo none; fi))"
        fi
    done
}

# ---------------------------------------------------------------------------------------------------------------
# Run folders and the lr choice of phase 1
# ---------------------------------------------------------------------------------------------------------------

data_ready() { [ -d "$(data_path "$1")" ]; }

# The run folder of every run, named as the run scripts name it, and its --max_steps (checks every command's options).
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
    run_dir = resolve_run_dir(train, Path(data.data_path.rstrip("/")).name)
    print(train.max_steps, run_dir)
'

resolve_run_dirs() {  # R_DIR, R_MAX_STEPS of the runs of the plan
    local i line duplicates resolved
    mapfile -t resolved < <(for i in "${!R_ID[@]}"; do
        run_command "$i" "$( (( R_PARENT[i] >= 0 )) && echo placeholder-init || true)"
        printf '%q ' "${CMD[@]}"; echo
    done | "$PYTHON" -c "$RESOLVE_RUN_DIRS")
    (( ${#resolved[@]} == ${#R_ID[@]} )) || fail "could not name the run folders (see the error above)"
    R_DIR=(); R_MAX_STEPS=()
    for line in "${resolved[@]}"; do R_MAX_STEPS+=("${line%% *}"); R_DIR+=("${line#* }"); done
    duplicates=$(printf '%s\n' "${R_DIR[@]}" | sort | uniq -d)
    [ -z "$duplicates" ] || fail "two runs of the plan would share a run folder (the same lr written twice?): $duplicates"
}

# Each sweep's lr from its phase-1 runs: results_matrix.lr_sweep_choice (the collector's rule for the best lr).
CHOOSE_LRS='
import sys

import results_matrix as rm

out, sweep_seeds, other_seeds = sys.argv[1:4]
records = rm.lr_sweep_choice([line.rstrip("\n").split("\t") for line in sys.stdin if line.strip()])
if out:
    rm.write_lr_choice(records, out, sweep_seeds.split(), other_seeds.split())
for r in records:
    print(r["sweep"], r["n"], r["chosen"] or "-", rm.lr_choice_summary(r), sep="\t")
'
FAILED_FILE=/dev/null  # the run numbers of the phase's failed or skipped runs (a file while running)
choose_lrs() {  # out dir ("" = write nothing), what a sweep without a choice means for phase 2 -> CHOSEN, NO_CHOICE
    local i c lines sweep n lr text
    CHOSEN=(); NO_CHOICE=0
    lines=$(for i in "${!R_ID[@]}"; do
        c=${R_CELL[$i]}
        is_swept "$c" || continue
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "${C_SWEEP[$c]}" "${R_N[$i]}" "${C_LR[$c]}" "${R_ID[$i]}" \
            "${R_DIR[$i]}" "${R_MAX_STEPS[$i]}" "$(grep -qx "$i" "$FAILED_FILE" && echo 1 || echo 0)"
    done | "$PYTHON" -c "$CHOOSE_LRS" "$1" "$SWEEP_SEEDS" "$OTHER_SEEDS") || return 1
    while IFS=$'\t' read -r sweep n lr text; do
        [ -n "$sweep" ] || continue
        if [ "$lr" = - ]; then
            echo "lr choice, N$n $sweep: $text; $2"
            NO_CHOICE=$(( NO_CHOICE + 1 ))
            continue
        fi
        echo "lr choice, N$n $sweep: $text"
        for c in "${!C_NAME[@]}"; do
            if [ "${C_SWEEP[$c]}" = "$sweep" ] && [ "${C_LR[$c]}" = "$lr" ]; then CHOSEN["$sweep $n"]=$c; fi
        done
    done <<< "$lines"
}

# ---------------------------------------------------------------------------------------------------------------
# Dry run: the plan of phase 1 (the whole plan without SWEEP_SEEDS), then what phase 2 runs
# ---------------------------------------------------------------------------------------------------------------

plan_phase1; assign_gpus; print_phase1
TOTAL_RUNS=${#R_ID[@]}
if [ -n "$DRY_RUN" ]; then
    print_commands
    for n in $NS; do
        data_ready "$n" || echo "would build $(data_path "$n")"
    done
    if [ -n "$TWO_PHASE" ]; then
        describe_phase2
        if (( N_SWEEPS > 0 )) && [ -d "$RUNS_DIR" ]; then  # results of phase 1 on disk?
            resolve_run_dirs
            choose_lrs "" "its phase 2 waits for these results" || fail "could not read the phase-1 results (above)"
            plan_phase2
            if (( ${#R_ID[@]} > 0 )); then assign_gpus; print_phase2; print_commands; fi
        fi
    fi
    exit 0
fi

# ---------------------------------------------------------------------------------------------------------------
# Data, then each phase: run folders, one worker per GPU
# ---------------------------------------------------------------------------------------------------------------

for n in $NS; do
    if ! data_ready "$n"; then
        "$PYTHON" kv_dataset_utils.py --name "N$n-K2V2-V62_$DATA_SIZE" --out "$(data_path "$n")" --n_valid "$N_VALID" --n_test "$N_TEST"
    fi
done
mkdir -p "$RUNS_DIR/logs"

json_field() {  # file, python expression on the parsed json `d` -> printed value ("" if the file is unreadable)
    "$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1" 2> /dev/null || true
}

mark_failed() {  # run number (in run_job_list): one more bad run, in its FAILED and in FAILED_FILE (the lr choice)
    FAILED[$1]=1; bad=$(( bad + 1 )); echo "$1" >> "$FAILED_FILE"
}

run_job_list() {  # worker position: run its jobs one after the other; status 1 if a run failed or was skipped
    local g=$1 worker=${WORKER_NAME[$1]} j i init log bad=0 status
    local -A FAILED=()
    export CUDA_VISIBLE_DEVICES=${WORKER_GPU[g]}
    for j in ${G_JOBS[g]}; do
        for i in ${J_RUNS[j]}; do
            log="$RUNS_DIR/logs/${R_ID[$i]}.log"
            if run_done "$i"; then
                echo "[gpu $worker] ${R_ID[$i]}: done before (${R_DIR[$i]}/all_results.json), skipped"
                continue
            fi
            init=""
            if (( R_PARENT[i] >= 0 )); then
                if [ -n "${FAILED[${R_PARENT[$i]}]:-}" ]; then
                    echo "[gpu $worker] ${R_ID[$i]}: SKIPPED, its warm start ${R_ID[${R_PARENT[$i]}]} failed"
                    mark_failed "$i"; continue
                fi
                init=$(json_field "${R_DIR[${R_PARENT[$i]}]}/all_results.json" "d.get('best_model_checkpoint') or ''")
                if [ -z "$init" ]; then
                    echo "[gpu $worker] ${R_ID[$i]}: SKIPPED, ${R_DIR[${R_PARENT[$i]}]} has no best checkpoint to start from"
                    mark_failed "$i"; continue
                fi
                if [ ! -d "$init" ]; then  # the parent's metrics were carried from another machine, its weights not
                    echo "[gpu $worker] ${R_ID[$i]}: SKIPPED, its warm start $init is not on this machine (the metrics of" \
                         "${R_ID[${R_PARENT[$i]}]} came from another sitting): delete ${R_DIR[${R_PARENT[$i]}]}/all_results.json" \
                         "to train it here again in the same sitting"
                    mark_failed "$i"; continue
                fi
            fi
            run_command "$i" "$init"
            echo "[gpu $worker] $(date '+%F %T') ${R_ID[$i]}: start (${R_MAX_STEPS[$i]} steps) -> ${R_DIR[$i]}, log $log"
            echo "$(date '+%F %T') CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $PYTHON" \
                 "$(printf '%q ' "${CMD[@]}")" >> "$log"
            status=0
            "$PYTHON" "${CMD[@]}" >> "$log" 2>&1 || status=$?
            if (( status != 0 )) || [ ! -f "${R_DIR[$i]}/all_results.json" ]; then
                echo "[gpu $worker] $(date '+%F %T') ${R_ID[$i]}: FAILED (exit $status), see $log"
                mark_failed "$i"
            else
                echo "[gpu $worker] $(date '+%F %T') ${R_ID[$i]}: finished, valid exact match" \
                     "$(json_field "${R_DIR[$i]}/all_results.json" "d['eval_exact_match']"), test generated exact" \
                     "match $(json_field "${R_DIR[$i]}/all_results.json" "d.get('test_generated_exact_match')")"
            fi
        done
    done
    (( bad == 0 ))
}

N_BAD=0  # workers with a failed or skipped run, sweeps without a choice (+1 if choosing or collecting fails)
run_done() {  # run number: its all_results.json is there, of a run with the planned --max_steps
    [ -f "${R_DIR[$1]}/all_results.json" ] \
        && [ "$(json_field "${R_DIR[$1]}/run_config.json" "d['cli_args']['max_steps']")" = "${R_MAX_STEPS[$1]}" ]
}

balance_runs_left() {  # after resolve_run_dirs: the jobs balanced again with the finished runs costing nothing
    local j i done_runs=0
    for j in "${!J_RUNS[@]}"; do
        J_COST[j]=0
        for i in ${J_RUNS[j]}; do
            if run_done "$i"; then done_runs=$(( done_runs + 1 ))
            else J_COST[j]=$(( J_COST[j] + $(run_cost "$i") )); fi
        done
    done
    (( done_runs > 0 )) || return 0
    assign_gpus
    print_plan "the same plan, balanced on the runs left to do ($done_runs done)" "the same runs"
}

run_plan() {  # one process per worker (WORKERS_PER_GPU per GPU), each running its jobs
    local g pid workers=()
    balance_runs_left
    for g in "${!WORKER_GPU[@]}"; do
        [ -n "${G_JOBS[g]}" ] || continue
        run_job_list "$g" &
        workers+=("$!")
    done
    for pid in "${workers[@]}"; do
        wait "$pid" || N_BAD=$(( N_BAD + 1 ))
    done
}

FAILED_FILE=$(mktemp)
trap 'rm -f "$FAILED_FILE"' EXIT
resolve_run_dirs
run_plan
if [ -n "$TWO_PHASE" ] && (( N_SWEEPS > 0 )); then
    echo "run_paper_claims: phase 1 done; each sweep's lr chosen on valid exact match -> $RESULTS_DIR/lr_choice.md"
    if ! choose_lrs "$RESULTS_DIR" "its phase 2 is SKIPPED"; then
        echo "run_paper_claims: could not choose the lrs from the phase-1 results (see above); phase 2 SKIPPED" >&2
        N_BAD=$(( N_BAD + 1 ))
    else
        N_BAD=$(( N_BAD + NO_CHOICE ))
        plan_phase2
        if (( ${#R_ID[@]} > 0 )); then
            assign_gpus; print_phase2
            : > "$FAILED_FILE"
            resolve_run_dirs
            run_plan
            TOTAL_RUNS=$(( TOTAL_RUNS + ${#R_ID[@]} ))
        fi
    fi
fi

if ! "$PYTHON" collect_results.py --runs "$RUNS_DIR" --out "$RESULTS_DIR" --copy_metrics "$RESULTS_DIR/runs"; then
    echo "run_paper_claims: collect_results.py failed (see above)" >&2
    N_BAD=$(( N_BAD + 1 ))
fi
if (( N_BAD > 0 )); then
    echo "run_paper_claims: some runs failed or were skipped (see the FAILED / SKIPPED lines above)" >&2
    exit 1
fi
echo "run_paper_claims: all $TOTAL_RUNS runs done; results in $RESULTS_DIR (matrix.md: the comparison)"
