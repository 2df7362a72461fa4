#!/usr/bin/env bash
# One sitting (about 8 minutes on 2 GPUs) that shows whether GradMem and a baseline learn phonebook and bAbI task 1
# from scratch, with nothing from a hub:
#   1. data, generated locally: phonebook_N$PB_N (phonebook_utils.py, train/valid/test) and bAbI task 1 stories in the
#      original text format (babi_generator.py -> $DATA/babi_qa1/qa1_single-supporting-fact_{train,valid,test}.txt);
#   2. one tokenizer per task, trained on its text (make_local_gpt2.py --tokenizer_only: byte-level BPE, a digit per
#      token, a <pad> token); the backbone is built from scratch by every run: Llama L$N_LAYER H$N_HEAD D$N_EMBD;
#   3. for every family in FAMILIES, task in TASKS and seed in SEEDS one run, at most $STEPS steps (and a wall-clock
#      guard): gradmem = run_gradmemgpt_on_<task>.py (--preset paper_kv: 8 memory vectors, K=2 second-order inner
#      SGD at inner lr 0.04, write head, inner loss x0.5), lm = run_gpt2_on_<task>.py (full-context Llama),
#      rmt = run_rmt_on_<task>.py (8 memory vectors, one forward write, memory projection); all at batch $BATCH,
#      AdamW lr $LR (beta2 0.95) after $WARMUP warmup steps; checkpoint selected on valid by the exact match of
#      generated answers; the selected checkpoint's test exact match (generated answers) is the result;
#      With BABI_SHORT_STEPS > 0, that many of every bAbI run's steps go first to stories of two statements and one
#      question ($DATA/babi_qa1_short, babi_generator.py --questions_per_story 1; run folders under babi_qa1_short/),
#      and the run goes on with the full stories from that model (--init_checkpoint) for the rest of its steps: a
#      length curriculum at the same total step count; PB_SHORT_STEPS > 0 does the same for phonebook, with phone books
#      of PB_SHORT_N entries first ($DATA/phonebook_N$PB_SHORT_N, the same tokenizer). SHORT_UNTIL=0.95 ends a short
#      stage early once its valid exact match (teacher-forced, the trainer's --stop_metric_value) reaches 0.95: the
#      full run then gets the steps and the time that the short stage left (as after a short stage that its wall-clock
#      guard stopped);
#   4. bench/lang_sitting_report.py: report.md / report.json (test EM, valid EM, chance, steps per task, family and
#      seed), curves.png; then metrics.tgz (json, png, samples, logs of every run; no checkpoints or weights) in $OUT.
# Jobs run one per GPU at a time (JOBS_PER_GPU: more), spread round-robin over the GPUs (NGPU: how many, default all
# that torch sees), so each GPU gets as many runs of every family; every run aims at the same training time, so the
# lanes end together. Without CUDA everything runs on the CPU (tests: tiny sizes, STEPS=2).
#
#   bash bench/language_tasks_sitting.sh                                   # the sitting; OUT=runs/lang_sitting
#   TASKS=babi FAMILIES=gradmem SEEDS=2 bash bench/language_tasks_sitting.sh   # one cell (resumes, or reports it)
#   DRY_RUN=1 bash bench/language_tasks_sitting.sh   # build data and tokenizers, print every run's command, train nothing
#
# Re-launching the same command resumes every unfinished run from its last checkpoint (the trainer's resume: same
# arguments; --max_steps and --max_train_minutes may differ) and reports finished ones without training, except a
# short stage that its full run has started from (stopped by its time guard, say): that one is kept as it ended, and
# the full run gets this sitting's whole share of time (the steps it has left are still those the short stage left).
# Delete $RUNS/<task>/<family>/run_<seed> to start a cell over, $DATA to regenerate the data.
#
# Step caps. Per run the sitting has SITTING_MINUTES x lanes / runs of wall clock, less OVERHEAD_S for start-up, data
# loading, graph recording and the final valid and test evaluations. The steps that fit are estimated from step
# times measured in the earlier sittings (Llama L4 D128, batch 64, TF32, H200, evaluations included; contexts of
# 64-72 tokens): alone on a GPU a GradMem and a full-context step took 21 ms; with three runs on one GPU 49 and 24 ms.
# So a step costs MS_<FAMILY> alone plus MS_<FAMILY>_SHARED per other run on the same GPU: MS_GRADMEM=21 +
# MS_GRADMEM_SHARED=14, MS_LM=21 + MS_LM_SHARED=2, MS_RMT=45 + MS_RMT_SHARED=45 (RMT not measured here: its preset's
# 20.8 steps/s, and as slow again per shared run), scaled by N_LAYER/4. The defaults (2 GPUs, 12 runs, 6 per GPU)
# give 80 s per run, 50 s of training: about 2350 steps of each family. These are estimates: read the steps/s in
# the logs of a first sitting and set STEPS (all families) or STEPS_GRADMEM / STEPS_LM / STEPS_RMT. Each run also
# stops at the first step after its share of training time (--max_train_minutes; that step is evaluated and saved),
# so the sitting ends on time, give or take the start-up estimate, whatever the step times are.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/lang_sitting}
RUNS=${RUNS:-runs/lang}
DATA=${DATA:-data/lang}
TASKS=${TASKS:-"phonebook babi"}
FAMILIES=${FAMILIES:-"gradmem lm"}
SEEDS=${SEEDS:-"1 2 3"}
PB_N=${PB_N:-4}
PB_SHORT_N=${PB_SHORT_N:-2}  # entries of the phone books that PB_SHORT_STEPS trains on first
N_TRAIN=${N_TRAIN:-50000}
N_VALID=${N_VALID:-500}
N_TEST=${N_TEST:-1000}
VOCAB=${VOCAB:-1000}
N_LAYER=${N_LAYER:-4}
N_HEAD=${N_HEAD:-4}
N_EMBD=${N_EMBD:-128}
BATCH=${BATCH:-64}
LR=${LR:-1e-3}
WARMUP=${WARMUP:-100}
PRECISION=${PRECISION:-tf32}  # fp32 (strict), tf32 or bf16 (autocast, fp32 master weights)
SITTING_MINUTES=${SITTING_MINUTES:-8}
JOBS_PER_GPU=${JOBS_PER_GPU:-1}
OVERHEAD_S=${OVERHEAD_S:-30}
MS_GRADMEM=${MS_GRADMEM:-21}
MS_GRADMEM_SHARED=${MS_GRADMEM_SHARED:-14}
MS_LM=${MS_LM:-21}
MS_LM_SHARED=${MS_LM_SHARED:-2}
MS_RMT=${MS_RMT:-45}
MS_RMT_SHARED=${MS_RMT_SHARED:-45}
EVALS=${EVALS:-8}                # evaluations per run (eval_steps = steps / EVALS)
GEN_EVAL=${GEN_EVAL:-200}        # valid samples whose answers are decoded at each evaluation (all at the end)
WORKERS=${WORKERS:-2}
BABI_SHORT_STEPS=${BABI_SHORT_STEPS:-0}  # bAbI steps on two-statement stories first (a length curriculum); 0: off
PB_SHORT_STEPS=${PB_SHORT_STEPS:-0}      # phonebook steps on PB_SHORT_N-entry phone books first; 0: off
SHORT_UNTIL=${SHORT_UNTIL:-}             # a short stage ends early at this valid exact match; the full run gets the rest
DRY_RUN=${DRY_RUN:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1

source bench/_wheels.sh && { [ -n "$DRY_RUN" ] || install_wheels "$PY"; }  # datasets & co. on a bare GPU machine
for task in $TASKS; do
    case $task in phonebook|babi) ;; *) echo "TASKS: unknown task $task (phonebook, babi)" >&2; exit 2 ;; esac
done
for family in $FAMILIES; do
    case $family in gradmem|lm|rmt) ;; *) echo "FAMILIES: unknown family $family (gradmem, lm, rmt)" >&2; exit 2 ;; esac
done
for name in BABI_SHORT_STEPS PB_SHORT_STEPS; do
    [[ "${!name}" =~ ^[0-9]+$ ]] \
        || { echo "$name=${!name}: give a number of steps (0: no short stage first)" >&2; exit 2; }
done
[ -z "$SHORT_UNTIL" ] || awk -v v="$SHORT_UNTIL" 'BEGIN { exit !(v + 0 == v && v > 0 && v <= 1) }' \
    || { echo "SHORT_UNTIL=$SHORT_UNTIL: give a valid exact match in (0, 1] (empty: the short stage runs all its steps)" \
         >&2; exit 2; }
[[ "$PB_SHORT_N" =~ ^[0-9]+$ ]] && (( PB_SHORT_N >= 1 && PB_SHORT_N < PB_N )) \
    || { echo "PB_SHORT_N=$PB_SHORT_N: give a number of entries from 1 to PB_N - 1 = $(( PB_N - 1 ))" >&2; exit 2; }
source scripts/_launch.sh && precision_args "$PRECISION"  # PRECISION_ARGS
NGPU=${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")} || exit 1  # GPUs 0 .. NGPU-1
DEVICE_ARGS=()
if (( NGPU == 0 )); then DEVICE_ARGS=(--use_cpu); fi
VISIBLE=${CUDA_VISIBLE_DEVICES:-}
GPU_IDS=(${VISIBLE//,/ })  # lanes take their GPUs from those already visible, if a list is set
if (( ${#GPU_IDS[@]} < NGPU )); then GPU_IDS=($(seq 0 $(( NGPU - 1 )))); fi
LANES=$(( (NGPU > 0 ? NGPU : 1) * JOBS_PER_GPU ))

# ------------------------------------------------------------------------------------------------ data, tokenizers
mkdir -p "$DATA" "$RUNS/logs" "$OUT"
PHONEBOOK=$DATA/phonebook_N$PB_N
BABI=$DATA/babi_qa1
BABI_SHORT=$DATA/babi_qa1_short
prepare() {
    for n in "$PB_N" $( (( PB_SHORT_STEPS > 0 )) && echo "$PB_SHORT_N"); do
        [ -d "$DATA/phonebook_N$n" ] || "$PY" phonebook_utils.py --n_entries "$n" --n_train "$N_TRAIN" \
            --n_valid "$N_VALID" --n_test "$N_TEST" --seed 142 --output_path "$DATA/phonebook_N$n" >/dev/null \
            || return 1
    done
    if [ ! -f "$BABI/qa1_single-supporting-fact_test.txt" ]; then
        "$PY" babi_generator.py --out "$BABI" --n_train "$N_TRAIN" --n_valid "$N_VALID" --n_test "$N_TEST" --seed 142 \
            --overwrite || return 1
    fi
    if (( BABI_SHORT_STEPS > 0 )) && [ ! -f "$BABI_SHORT/qa1_single-supporting-fact_test.txt" ]; then
        # two-statement stories hold 24,600 distinct samples: at most 20,000 for train
        "$PY" babi_generator.py --out "$BABI_SHORT" --n_train $(( N_TRAIN < 20000 ? N_TRAIN : 20000 )) \
            --n_valid "$N_VALID" --n_test "$N_TEST" --seed 142 --questions_per_story 1 --overwrite || return 1
    fi
    if [ ! -d "${BABI}_prepared" ]; then  # the strings the runs read, for the tokenizer's training text
        "$PY" babi_utils.py --babi_dir "$BABI" --task qa1 --output_path "${BABI}_prepared" >/dev/null || return 1
    fi
    for texts in "$PHONEBOOK" "${BABI}_prepared"; do
        tok=$DATA/tok_$(basename "${texts%_prepared}")
        [ -f "$tok/tokenizer.json" ] || "$PY" make_local_gpt2.py --texts "$texts" --out "$tok" --tokenizer_only \
            --pad_token --split_digits --vocab_size "$VOCAB" --overwrite || return 1
    done
}
prepare || { echo "data preparation failed" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------ runs
JOBS=()
for family in $FAMILIES; do for task in $TASKS; do for seed in $SEEDS; do JOBS+=("$family $task $seed"); done; done; done
PER_LANE=$(( (${#JOBS[@]} + LANES - 1) / LANES ))
TRAIN_S=$(awk -v m="$SITTING_MINUTES" -v p="$PER_LANE" -v o="$OVERHEAD_S" 'BEGIN { t = m * 60 / p - o; print (t < 10 ? 10 : t) }')
MINUTES=$(awk -v t="$TRAIN_S" 'BEGIN { printf "%.2f", t / 60 }')

steps_for() {  # steps_for FAMILY -> the step cap: STEPS, STEPS_<FAMILY>, or what fits TRAIN_S at the estimated step time
    local family=$1 upper ms shared
    upper=$(echo "$family" | tr a-z A-Z)
    local explicit="STEPS_$upper"
    if [ -n "${!explicit:-}" ]; then echo "${!explicit}"; return; fi
    if [ -n "${STEPS:-}" ]; then echo "$STEPS"; return; fi
    ms="MS_$upper" shared="MS_${upper}_SHARED"
    awk -v t="$TRAIN_S" -v ms="${!ms}" -v sh="${!shared}" -v l="$N_LAYER" -v j="$JOBS_PER_GPU" \
        'BEGIN { s = int(t * 1000 / ((ms + (j - 1) * sh) * l / 4) / 50) * 50; print (s < 50 ? 50 : s) }'
}

short_var_of() {  # short_var_of TASK -> the name of the setting with the steps of its short stage (0: none)
    if [ "$1" = babi ]; then echo BABI_SHORT_STEPS; else echo PB_SHORT_STEPS; fi
}

short_steps_of() {  # short_steps_of TASK -> the steps of its short stage
    local var
    var=$(short_var_of "$1")
    echo "${!var}"
}

stages_of() {  # stages_of TASK -> the runs of one job in order: TASK_short first where it has short steps
    if (( $(short_steps_of "$1") > 0 )); then echo "$1_short $1"; else echo "$1"; fi
}

run_took() {  # run_took RUN_DIR -> "STEPS SECONDS" of training a finished run took; nothing where it has not run
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["global_step"], r["train_wall_s"])' \
        "$1/all_results.json" 2>/dev/null
}

folder_of() {  # folder_of STAGE -> the folder of a stage's data and runs (phonebook_N4, babi_qa1_short, ...)
    case $1 in
        phonebook) echo "phonebook_N$PB_N" ;;   phonebook_short) echo "phonebook_N$PB_SHORT_N" ;;
        babi) echo babi_qa1 ;;                  babi_short) echo babi_qa1_short ;;
    esac
}

command_for() {  # command_for FAMILY STAGE SEED -> the run's command line in CMD (STAGE: a task, or TASK_short)
    local family=$1 stage=$2 seed=$3 name data tok gen steps script model minutes warm=() until=() short
    local task=${2%_short}
    steps=$(steps_for "$family")
    minutes=$MINUTES
    short=$(short_steps_of "$task")
    name=$(folder_of "$stage")  # also the stage's data folder under $DATA
    if [ "$task" = phonebook ]; then
        data=(--dataset_name "$DATA/$name"); tok=$DATA/tok_phonebook_N$PB_N; gen=16
    else
        data=(--babi_dir "$DATA/$name" --babi_task qa1); tok=$DATA/tok_babi_qa1; gen=4
    fi
    if [ "$stage" != "$task" ]; then  # the short stage: its share of the steps and of the time
        minutes=$(awk -v m="$MINUTES" -v a="$short" -v s="$steps" 'BEGIN { printf "%.2f", m * a / s }')
        steps=$short
        [ -z "$SHORT_UNTIL" ] || until=(--stop_metric_value "$SHORT_UNTIL")
    elif (( short > 0 )); then  # the rest, from the short stage's model: the steps and the time that it left
        local took took_s
        read -r took took_s < <(run_took "$RUNS/$(folder_of "${task}_short")/$family/run_$seed")
        if [ -n "$took" ] && [ -f "$RUNS/$name/$family/run_$seed/run_config.json" ]; then
            short=$took  # resumed in a later sitting: the whole share of this one
        elif [ -n "$took" ]; then  # the short stage ran before it in this sitting
            minutes=$(awk -v m="$MINUTES" -v t="$took_s" 'BEGIN { r = m - t / 60; printf "%.2f", r < 0.05 ? 0.05 : r }')
            short=$took
        else  # not run yet (a dry run): the planned shares
            minutes=$(awk -v m="$MINUTES" -v a="$short" -v s="$steps" 'BEGIN { printf "%.2f", m * (s - a) / s }')
        fi
        steps=$(( steps - short ))
        warm=(--init_checkpoint "$RUNS/$(folder_of "${task}_short")/$family/run_$seed/model.safetensors")
    fi
    case $family in
        gradmem) script=run_gradmemgpt_on_$task.py
                 model=(--preset paper_kv --attn_implementation exact_eager) ;;
        lm)      script=run_gpt2_on_$task.py; model=() ;;
        rmt)     script=run_rmt_on_$task.py
                 model=(--n_mem_tokens 8 --K 1 --mem_proj_mode proj --attn_implementation sdpa) ;;
    esac
    CMD=("$PY" "$script" "${data[@]}" --base_model llama --n_layer "$N_LAYER" --n_head "$N_HEAD" --n_embd "$N_EMBD"
         --tokenizer_path "$tok" "${model[@]}" "${warm[@]}" "${until[@]}" --exp_path "$RUNS/$name/$family/run_$seed"
         --seed $((142 + seed)) --per_device_batch_size "$BATCH" --per_device_eval_batch_size 256 --learning_rate "$LR"
         --lr_scheduler_type constant_with_warmup --warmup_steps "$WARMUP" --adam_beta2 0.95 --max_grad_norm 1.0
         --max_steps "$steps" --eval_steps $(( steps / EVALS > 0 ? steps / EVALS : 1 ))
         --logging_steps $(( steps / EVALS > 0 ? steps / EVALS : 1 )) --max_train_minutes "$minutes"
         --early_stopping_patience 0 --metric_for_best_model squad_exact_match --generation_max_new_tokens "$gen"
         --generation_eval_samples "$GEN_EVAL" --report_to none --dataloader_num_workers "$WORKERS"
         "${PRECISION_ARGS[@]}" "${DEVICE_ARGS[@]}")
}

for task in $TASKS; do
    short=$(short_steps_of "$task")
    (( short > 0 )) || continue
    for family in $FAMILIES; do
        cap=$(steps_for "$family")
        (( short < cap )) || { echo "$(short_var_of "$task")=$short leaves no step of $family's $cap for the full" \
            "$task task; give fewer, or more steps (STEPS)" >&2; exit 2; }
    done
done
echo "sitting: ${#JOBS[@]} runs on $LANES lane(s) ($NGPU GPU(s) x $JOBS_PER_GPU), $PER_LANE per lane, ~${TRAIN_S} s" \
     "of training per run (guard: $MINUTES min); steps: $(for f in $FAMILIES; do printf '%s %s ' "$f" "$(steps_for "$f")"; done)"
lane() {  # lane L: jobs L, L + LANES, ... one after the other on GPU L % NGPU (none without GPUs)
    local l=$1 i family task seed stage log gpu="" start rc
    if (( NGPU > 0 )); then gpu=${GPU_IDS[$(( l % NGPU ))]}; fi
    for (( i = l; i < ${#JOBS[@]}; i += LANES )); do
        read -r family task seed <<<"${JOBS[$i]}"
        for stage in $(stages_of "$task"); do
            command_for "$family" "$stage" "$seed"
            if [ "$stage" != "$task" ] && [ -f "$RUNS/$(folder_of "$task")/$family/run_$seed/run_config.json" ]; then
                echo "$stage $family seed $seed: kept as it ended (the $task run started from it)"
                continue  # resuming it now would change the model the full run started from
            fi
            if [ -n "$DRY_RUN" ]; then
                printf 'CUDA_VISIBLE_DEVICES=%s ' "$gpu"; printf '%q ' "${CMD[@]}"; echo
                continue
            fi
            log=$RUNS/logs/${task}_${family}_$seed.log
            echo "=== $(date -u '+%F %T') lane $l, CUDA_VISIBLE_DEVICES=$gpu: ${CMD[*]}" >>"$log"
            start=$SECONDS
            CUDA_VISIBLE_DEVICES=$gpu "${CMD[@]}" >>"$log" 2>&1
            rc=$?
            echo "$stage $family seed $seed: rc=$rc wall_s=$(( SECONDS - start ))"
            (( rc == 0 )) || break  # the full task needs the short stage's model
        done
    done
}
for (( l = 0; l < LANES; l++ )); do
    if [ -n "$DRY_RUN" ]; then lane "$l"; else lane "$l" & fi
done
wait
[ -n "$DRY_RUN" ] && exit 0

# ------------------------------------------------------------------------------------------------ report, pack
"$PY" bench/lang_sitting_report.py --runs "$RUNS" --out "$OUT" --data "$DATA"
tar czf "$OUT/metrics.tgz" --exclude='checkpoint-*' --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
    --exclude='tokenizer*' --exclude='special_tokens_map.json' -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
ls -la "$OUT"
