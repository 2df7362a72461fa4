# One sitting of the comparison matrix at N8 on one H200 (run from the repository root, resumable: run it again):
# (a) phase 2 of GradMem and RMT at K=1 and K=2 (the lr chosen on seed 1, on seeds 2 and 3; 8 runs at once) and
# (b) phase 1 and 2 of the full-context Llama and Mamba (6 runs at once, then their phase 2), side by side (as run on
# 2026-12-03) or after (a) (SERIAL=1).
# OUT: where the logs go; LIMIT: seconds the matrix may run (then its runs stop and resume in the next command on the
# same machine). SERIAL=1: (a) first, with all of LIMIT, then (b) in what is left (14 at once made 7,000-10,000 steps
# per run in a session's 1,600 s of command time, too few to finish: runs not finished when the machine goes back
# start again from step 0 on the next one). B_ONLY: the families of (b) (e.g. "mamba": its three lrs, 10,000 steps).
set -u
OUT=${OUT:-/tmp/sitting} LIMIT=${LIMIT:-520} SERIAL=${SERIAL:-} B_ONLY=${B_ONLY:-"llama mamba"}
start=$SECONDS
mkdir -p "$OUT" runs/kv_matrix && cp -r results/kv_matrix/runs/. runs/kv_matrix/
[ -d data/N8-K2V2-V62_1M ] || python3 kv_dataset_utils.py --name N8-K2V2-V62_1M --out data/N8-K2V2-V62_1M \
    --n_valid 5000 --n_test 2000 > "$OUT/data.log" 2>&1
export NS=8 SEEDS="1 2 3" SWEEP_SEEDS=1 GPUS=0 PRECISION=tf32
ONLY="gradmem rmt" K="1 2" WORKERS_PER_GPU=8 timeout "$LIMIT" bash scripts/run_paper_claims.sh > "$OUT/a.log" 2>&1 &
[ -n "$SERIAL" ] && wait
left=$((LIMIT - (SECONDS - start)))
[ "$left" -gt 30 ] && ONLY="$B_ONLY" WORKERS_PER_GPU=6 RESULTS_DIR=/tmp/results_b timeout "$left" \
    bash scripts/run_paper_claims.sh > "$OUT/b.log" 2>&1 &
wait
pkill -f "[r]un_.*_on_kv_retrieval"
tail -n 3 runs/kv_matrix/logs/*.log > "$OUT/progress.log" 2>&1
for f in json md; do  # each part's lr choice (phase 1 -> phase 2), for results/kv_matrix
    cp results/kv_matrix/lr_choice.$f "$OUT/" 2>/dev/null
    cp /tmp/results_b/lr_choice.$f "$OUT/lr_choice_b.$f" 2>/dev/null
done
# every run's metrics, records and logs; of the checkpoints only trainer_state.json (an unfinished run's log so far)
find runs/kv_matrix -type f \( ! -path '*/checkpoint-*' -o -name trainer_state.json \) ! -name '*.safetensors' \
    ! -name '*.pt' ! -name '*.pth' ! -name '*.bin' | tar czf "$OUT/runs.tgz" -T -
