#!/usr/bin/env bash
# One sitting of KV capacity runs on a GPU machine: the jobs of a jobs file, each a scripts/run_kv_capacity.sh call,
# queued per GPU (a GPU's jobs run one after the other, the GPUs side by side), then the metrics packed into $OUT.
#
#   JOBS=sitting.jobs OUT=$OUT bash bench/capacity_sitting.sh
#
# A jobs file has one job per line: GPU MINUTES then the preset's environment, then optionally -- and extra
# arguments for every stage ('#' starts a comment line):
#   0 8   SEED=1 OUT_DIR=runs/kv_capacity/seed_1_n96 STAGES="96:0.90:K=5,inner_lr=0.12,max_steps=36000"
#   1 2.5 SEED=1 OUT_DIR=runs/kv_capacity/fast/seed_1 STAGES="2:0.95 4:0.95 8:0.95 16:0.95"
#   1 2.5 SEED=2 OUT_DIR=runs/kv_capacity/fast/seed_2 STAGES="2:0.95 4:0.95 8:0.95 16:0.95" -- --warmup_steps 100
# MINUTES is the job's training budget (BUDGET_MINUTES); re-running the same jobs resumes every run where it stopped.
# A line GPU MINUTES ! command runs any other command on that GPU in its turn (bash -c, stopped after MINUTES;
# OUT and PYTHON are set for it), its output in $OUT/job_<line index>.log:
#   1 3   ! $PYTHON bench/bench_step.py --contexts 512 --batches 64 --rows recompute:fused_double_bwd:tf32 --out $OUT/step.md
# Environment:
#   OUT [runs/sitting]  where the packed files go: metrics.tgz (json, png and logs of every OUT_DIR, no checkpoints)
#   COPY ["src:dst ..."] folders copied into place before the jobs, each pair once (a later sitting on the same machine
#                        keeps what its runs wrote); several sources may fill one dst (a run's records, then its
#                        resume state)
#   PREPARE ["64 96"]    KV datasets data/N<n>-K2V2-V62_1M built before the jobs start
#   STATE ["OUT_DIR/N96 ..."] stage folders whose latest checkpoint (full state, to resume elsewhere) and
#                        selected checkpoint (weights and config) are packed as state_<k>.tar / best_<k>.tar
#   MINUTES [unset]      every job's MINUTES replaced by this one (from the same jobs file, a session's later
#                        commands train for the device time they have, the first one less)
#   DRY_RUN [unset]      check the jobs file (every job's STAGES parsed as the curriculum parses them) and COPY, print
#                        the jobs per GPU, run nothing
# Wheels the machine lacks (datasets, dill, multiprocess) are installed from .whl/ when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:?JOBS=<jobs file> is required (one job per line: GPU MINUTES VAR=value ... [-- args])}
OUT=${OUT:-runs/sitting}
PYTHON=${PYTHON:-python3}
[ -f "$JOBS" ] \
    || { echo "JOBS=$JOBS: no such file; write one job per line: GPU MINUTES VAR=value ... [-- args]" >&2; exit 2; }
is_minutes() { [[ "$1" =~ ^[0-9]*\.?[0-9]+$ ]]; }
[ -z "${MINUTES:-}" ] || is_minutes "$MINUTES" \
    || { echo "MINUTES=$MINUTES: give every job's training minutes as a number (e.g. MINUTES=8.5), or leave it unset" >&2
         exit 2; }

# read and check every job before anything runs: GPU_OF, MIN_OF, REST_OF (the rest of the line), OUT_DIRS (empty
# for a command job)
GPU_OF=(); MIN_OF=(); REST_OF=(); OUT_DIRS=()
while IFS= read -r line || [ -n "$line" ]; do
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    read -r gpu minutes rest <<<"$line"
    [[ "$gpu" =~ ^[0-9]+$ ]] || { echo "$JOBS: '$line': the first field must be a GPU index" >&2; exit 2; }
    is_minutes "$minutes" || { echo "$JOBS: '$line': the second field must be minutes" >&2; exit 2; }
    [ -n "${MINUTES:-}" ] && minutes=$MINUTES
    if [[ "$rest" == "!"* ]]; then  # a command job
        [ -n "${rest#!}" ] || { echo "$JOBS: '$line': no command after !" >&2; exit 2; }
        GPU_OF+=("$gpu"); MIN_OF+=("$minutes"); REST_OF+=("$rest"); OUT_DIRS+=("")
        continue
    fi
    { read -r dir; read -r stages; } < <(unset OUT_DIR STAGES; eval "${rest%% -- *}" >/dev/null 2>&1
                                         printf '%s\n%s\n' "${OUT_DIR:-}" "${STAGES:-}")
    [ -n "$dir" ] \
        || { echo "$JOBS: '$line': set OUT_DIR=runs/... (where the job's run folders go)" >&2; exit 2; }
    # shellcheck disable=SC2086  # STAGES is a list of words
    [ -z "$stages" ] || "$PYTHON" -c "import sys, curriculum; curriculum.parse_stages(sys.argv[1:])" $stages \
        || { echo "$JOBS: '$line': its STAGES do not parse (above)" >&2; exit 2; }
    GPU_OF+=("$gpu"); MIN_OF+=("$minutes"); REST_OF+=("$rest"); OUT_DIRS+=("$dir")
done <"$JOBS"
(( ${#GPU_OF[@]} > 0 )) || { echo "$JOBS holds no job" >&2; exit 2; }
for pair in ${COPY:-}; do
    [[ "$pair" == *:* && -d "${pair%%:*}" ]] || { echo "COPY: '$pair' must be src:dst with src a folder" >&2; exit 2; }
done
GPUS=$(printf '%s\n' "${GPU_OF[@]}" | sort -un)
jobs_on() { local i; for i in "${!GPU_OF[@]}"; do [ "${GPU_OF[$i]}" = "$1" ] && echo "$i"; done; }  # in file order
if [ -n "${DRY_RUN:-}" ]; then
    for gpu in $GPUS; do
        for i in $(jobs_on "$gpu"); do echo "GPU $gpu, ${MIN_OF[$i]} min: ${REST_OF[$i]}"; done
    done
    exit 0
fi

mkdir -p "$OUT" data
export PYTHONUNBUFFERED=1
source bench/_wheels.sh && install_wheels "$PYTHON"
for pair in ${COPY:-}; do
    src=${pair%%:*}; dst=${pair#*:}
    marker="$dst/.copied_${src//\//_}"
    [ -e "$marker" ] && continue
    mkdir -p "$dst" && cp -r "$src/." "$dst/" && touch "$marker"
done
for n in ${PREPARE:-}; do
    [ -d "data/N$n-K2V2-V62_1M" ] \
        || "$PYTHON" kv_dataset_utils.py --name "N$n-K2V2-V62_1M" --out "data/N$n-K2V2-V62_1M" >/dev/null &
done
wait

run_job() {  # job index: the preset with the job's environment, extra arguments after --; or the job's command
    local line=${REST_OF[$1]} assignments args=""
    if [[ "$line" == "!"* ]]; then
        CUDA_VISIBLE_DEVICES=${GPU_OF[$1]} OUT=$OUT PYTHON=$PYTHON timeout "${MIN_OF[$1]}m" bash -c "${line#!}" \
            >"$OUT/job_$1.log" 2>&1
        echo "job $1 (GPU ${GPU_OF[$1]}, command) exit $?"
        return
    fi
    assignments="BUDGET_MINUTES=${MIN_OF[$1]} ${line%% -- *}"
    [[ "$line" == *" -- "* ]] && args=${line#* -- }
    mkdir -p "${OUT_DIRS[$1]}"
    eval "CUDA_VISIBLE_DEVICES=${GPU_OF[$1]} PYTHON=$PYTHON $assignments bash scripts/run_kv_capacity.sh $args" \
        >>"${OUT_DIRS[$1]}/sittings.log" 2>&1
    echo "job $1 (GPU ${GPU_OF[$1]}, ${OUT_DIRS[$1]}) exit $?"
}
for gpu in $GPUS; do
    (for i in $(jobs_on "$gpu"); do run_job "$i"; done) &
done
wait

RUN_DIRS=$(printf '%s\n' "${OUT_DIRS[@]}" | grep . | sort -u)  # the preset jobs' folders
for dir in $RUN_DIRS; do
    "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); [print(sys.argv[1], {k: s[k] for k in \
('stage', 'global_step', 'end_s', 'eval_exact_match', 'test_generated_exact_match') if k in s}) for i in \
r['invocations'] for s in i['stages']]" "$dir/curriculum.json" 2>/dev/null
done
if [ -n "$RUN_DIRS" ]; then
    find $RUN_DIRS -path '*/checkpoint-*' -prune -o \( -name '*.json' -o -name '*.png' -o -name '*.log' \) -size -3M \
        -print | tar czf "$OUT/metrics.tgz" -T -
fi
k=0
for stage_dir in ${STATE:-}; do
    k=$((k + 1))
    last=$(ls -d "$stage_dir"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
    [ -n "$last" ] && tar cf "$OUT/state_$k.tar" "$last" "$stage_dir/run_config.json"
    best=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['best_model_checkpoint'])" \
        "$stage_dir/all_results.json" 2>/dev/null)
    [ -n "$best" ] && [ -d "$best" ] && tar cf "$OUT/best_$k.tar" "$best/model.safetensors" "$best/config.json"
    echo "state_$k: $stage_dir (latest $last, selected ${best:-none})"
done
ls -la "$OUT"
