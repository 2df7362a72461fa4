# One sitting of the comparison matrix on one GPU machine (run from the repository root; resumable: run it again on the
# same machine and its runs go on from their checkpoints). Two parts, each a scripts/run_paper_claims.sh call with
# SWEEP_SEEDS=1 (phase 1: every lr on seed 1; phase 2: the lr chosen on seed 1, on the other seeds of its SEEDS) at
# the N of NS [8] (NS="8 16": each N16 run warm-starts from its N8 parent, trained in the sitting or carried in):
#   (a) A_ONLY ["gradmem rmt"] at A_K ["1 2"] on A_SEEDS ["1 2 3"], A_WORKERS [8] runs at once;
#   (b) B_ONLY ["llama mamba"] on B_SEEDS ["1 2 3"], B_WORKERS [6] runs at once; B_ONLY="" leaves (b) out.
# A_SEEDS=1 runs phase 1 alone, so a sweep can be split over sittings (the recipe's variables pass through, e.g.
# GRADMEM_ILRS_K5="0.3 2.0" RMT_LRS="1e-4 3e-4"); a later sitting with the whole sweep skips the finished runs.
# The parts run side by side, or (b) after (a) with SERIAL=1. LIMIT [520]: seconds the sitting may run (then its runs
# stop and resume in the next command on the same machine). Runs not finished when the machine is given back start
# again from step 0 on the next one: plan a sitting that finishes (two K=5 runs at N8, GradMem beside RMT: about
# 500 s; six GradMem/RMT K=1/K=2 runs finished 10,000 steps in 12.5 minutes).
# Carried in, copied into RUNS_DIR first: results/kv_matrix/runs/ (the finished runs' metrics: those runs are
# skipped) and, where it exists, results/kv_matrix/weights/ (selected checkpoints' weights of earlier sittings,
# restored from git history: the warm starts of N16 runs whose N8 parents trained elsewhere; see
# results/kv_matrix/README.md).
# OUT, at most 8 files (what a device call brings back): the logs (a.log, b.log, data.log, progress.log, mps.log),
# lr_choice.tgz (lr_choice.{json,md}: results/kv_matrix/lr_choice.json with the choices of (a) and (b) merged in,
# results_matrix.write_lr_choice's rule; copy both to results/kv_matrix), runs.tgz (every run's metrics and logs; of the
# checkpoints only trainer_state.json) and weights.tgz (the selected checkpoint's model.safetensors of every run
# finished in this sitting, up to WEIGHTS_MB [15] MB; progress.log names those left out). DRY_RUN=1: the parts'
# plans, nothing run. MPS=1: the runs share the GPU through CUDA MPS (bench/_mps.sh; what it did in $OUT/mps.log;
# without MPS where it cannot start).
# Arguments go to every run of both parts (run_paper_claims.sh's extra arguments), e.g. --fast_step off.
#   SERIAL=1 B_ONLY=mamba OUT=$OUT bash bench/sittings/claims.sh          # phase 2 at K=1, 2, then Mamba's sweep
#   SERIAL=1 A_K=5 A_SEEDS=1 GRADMEM_ILRS_K5="0.3 2.0" RMT_LRS="1e-4 3e-4" B_ONLY= OUT=$OUT \
#       bash bench/sittings/claims.sh                                     # half of the K=5 sweeps, seed 1
set -u
OUT=${OUT:-/tmp/sitting} LIMIT=${LIMIT:-520} SERIAL=${SERIAL:-} NS=${NS:-8} PYTHON=${PYTHON:-python3}
A_ONLY=${A_ONLY-"gradmem rmt"} A_K=${A_K-"1 2"} A_SEEDS=${A_SEEDS-"1 2 3"} A_WORKERS=${A_WORKERS:-8}
B_ONLY=${B_ONLY-"llama mamba"} B_SEEDS=${B_SEEDS-"1 2 3"} B_WORKERS=${B_WORKERS:-6}
RUNS_DIR=${RUNS_DIR:-runs/kv_matrix} WORK=${WORK:-/tmp/claims_sitting}
export RUNS_DIR NS PYTHON SWEEP_SEEDS=1 GPUS=0 PRECISION=tf32
start=$SECONDS
mkdir -p "$OUT" "$RUNS_DIR" "$WORK/results_a" && cp -r results/kv_matrix/runs/. "$RUNS_DIR/"
# the lr choices so far, which (a) adds its own to (and (b)'s at the end); -n: a resumed sitting keeps what it wrote
if [ -f results/kv_matrix/lr_choice.json ]; then cp -n results/kv_matrix/lr_choice.{json,md} "$WORK/results_a/"; fi
if [ -d results/kv_matrix/weights ]; then cp -r results/kv_matrix/weights/. "$RUNS_DIR/"; fi
touch "$WORK/sitting_start"  # runs whose all_results.json is newer finished in this sitting
if [ -n "${MPS:-}" ] && [ -z "${DRY_RUN:-}" ]; then
    source bench/_mps.sh
    mps_start "$PYTHON" > "$OUT/mps.log" 2>&1 && trap mps_stop EXIT
fi
for n in $NS; do  # the datasets, built once before the parts start (both read them)
    [ -n "${DRY_RUN:-}" ] || [ -d "data/N$n-K2V2-V62_1M" ] || "$PYTHON" kv_dataset_utils.py --name "N$n-K2V2-V62_1M" \
        --out "data/N$n-K2V2-V62_1M" --n_valid 5000 --n_test 2000 >> "$OUT/data.log" 2>&1
done
if [ -n "$A_ONLY" ]; then
    ONLY="$A_ONLY" K="$A_K" SEEDS="$A_SEEDS" WORKERS_PER_GPU=$A_WORKERS RESULTS_DIR="$WORK/results_a" \
        timeout "$LIMIT" bash scripts/run_paper_claims.sh "$@" > "$OUT/a.log" 2>&1 &
    [ -n "$SERIAL" ] && wait
fi
left=$((LIMIT - (SECONDS - start)))
[ -n "$B_ONLY" ] && [ "$left" -gt 30 ] && ONLY="$B_ONLY" SEEDS="$B_SEEDS" WORKERS_PER_GPU=$B_WORKERS \
    RESULTS_DIR="$WORK/results_b" timeout "$left" bash scripts/run_paper_claims.sh "$@" > "$OUT/b.log" 2>&1 &
wait
pkill -f "[r]un_.*_on_kv_retrieval"
tail -n 3 "$RUNS_DIR"/logs/*.log > "$OUT/progress.log" 2>&1
# the lr choices (phase 1 -> phase 2): the earlier ones with (a)'s and (b)'s, for results/kv_matrix
if [ -f "$WORK/results_b/lr_choice.json" ]; then
    "$PYTHON" -c 'import sys, results_matrix as rm; rm.merge_lr_choice(*sys.argv[1:])' \
        "$WORK/results_b/lr_choice.json" "$WORK/results_a" >> "$OUT/progress.log" 2>&1
fi
if [ -f "$WORK/results_a/lr_choice.json" ]; then
    tar czf "$OUT/lr_choice.tgz" -C "$WORK/results_a" lr_choice.json lr_choice.md
fi
# every run's metrics, records and logs; of the checkpoints only trainer_state.json (an unfinished run's log so far)
find "$RUNS_DIR" -type f \( ! -path '*/checkpoint-*' -o -name trainer_state.json \) ! -name '*.safetensors' \
    ! -name '*.pt' ! -name '*.pth' ! -name '*.bin' | tar czf "$OUT/runs.tgz" -T -
# the selected weights of the runs finished in this sitting, the warm starts of their N16 (N32) runs elsewhere
"$PYTHON" bench/finished_weights.py "$RUNS_DIR" "$WORK/sitting_start" --max_mb "${WEIGHTS_MB:-15}" \
    > "$WORK/weights.list" 2>> "$OUT/progress.log"
if [ -s "$WORK/weights.list" ]; then tar czf "$OUT/weights.tgz" -T "$WORK/weights.list"; fi
