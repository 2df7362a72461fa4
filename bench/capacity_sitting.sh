#!/usr/bin/env bash
# One sitting of the KV capacity runs on a GPU machine: scripts/run_kv_capacity.sh for each seed, one seed per GPU,
# stopped after MINUTES of training (re-running the same sitting resumes every seed where it stopped), then the
# metrics of every stage packed into $OUT.
#   SEEDS="1 2" STAGES="2:0.95 4:0.95 8:0.95 16:0.95 32:0.95" MINUTES=8 bash bench/capacity_sitting.sh
#   PREPARE="64 96"   build the N64/N96 datasets in the background while the seeds train
#   SHIP="1:N8,N16"   copy those stages' selected checkpoints (weights + config) of seed 1 into $OUT
#   STATE="1:N32"     copy the latest checkpoint of seed 1's N32 (to resume it on another machine) into $OUT
# Wheels the machine lacks (datasets, dill, multiprocess) are installed from .whl/ when it exists.
set -uo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"1 2"}
MINUTES=${MINUTES:-8}
OUT=${OUT:-runs/sitting}
mkdir -p "$OUT" data
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'datasets', datasets.__version__, [torch.cuda.get_device_name(i) for i in \
range(torch.cuda.device_count())])"
NGPU=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")

build() {  # build ./data/N<n>-K2V2-V62_1M with a test split unless it exists
    [ -d "data/N$1-K2V2-V62_1M" ] || python3 kv_dataset_utils.py --name "N$1-K2V2-V62_1M" --out "data/N$1-K2V2-V62_1M" \
        >/dev/null
}
for n in ${PREPARE:-}; do build "$n" & done  # beside the training below (a stage builds its own data if missing)

i=0
for seed in $SEEDS; do
    CUDA_VISIBLE_DEVICES=$((i % NGPU)) SEED=$seed BUDGET_MINUTES=$MINUTES bash scripts/run_kv_capacity.sh \
        >>"$OUT/seed_$seed.log" 2>&1 &
    i=$((i + 1))
done
wait

for seed in $SEEDS; do
    dir=runs/kv_capacity/seed_$seed
    cat "$OUT/seed_$seed.log" >>"$dir/sittings.log"
    tar czf "$OUT/metrics_seed_$seed.tgz" --exclude='checkpoint-*' "$dir"
    tail -n 5 "$OUT/seed_$seed.log"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); [print(sys.argv[1], s) for i in r['invocations'] \
for s in i['stages']]" "$dir/curriculum.json" 2>/dev/null
done
for item in ${SHIP:-}; do
    seed=${item%%:*}
    stages=${item#*:}
    files=()
    for st in ${stages//,/ }; do
        best=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['best_model_checkpoint'])" \
            "runs/kv_capacity/seed_$seed/$st/all_results.json" 2>/dev/null) || continue
        files+=("$best/model.safetensors" "$best/config.json")
    done
    [ ${#files[@]} -gt 0 ] && tar cf "$OUT/ship_seed_$seed.tar" "${files[@]}"
done
for item in ${STATE:-}; do
    seed=${item%%:*}; st=${item#*:}
    last=$(ls -d "runs/kv_capacity/seed_$seed/$st"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -1)
    [ -n "$last" ] && tar cf "$OUT/state_seed_${seed}_$st.tar" "$last" "runs/kv_capacity/seed_$seed/$st/run_config.json"
done
rm -f "$OUT"/seed_*.log
ls -la "$OUT"
