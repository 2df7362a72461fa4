# Launch arithmetic shared by the presets (sourced, not run):   source scripts/_launch.sh && launch_setup
#
# Reads (from the environment or the preset's own variables):
#   NP            number of processes = GPUs, in total over all machines (default 1)
#   TBS           total batch size of one optimizer step
#   PER_DEVICE    the largest micro-batch one process may take (the preset's single-GPU value, i.e. what fits
#                 the memory of one GPU)
#   NUM_MACHINES  machines (default 1); with more than one, also MACHINE_RANK (0 .. NUM_MACHINES-1, default 0)
#                 and MAIN_PROCESS_IP (address of machine 0); run the same command on every machine
# Sets:
#   PER_DEVICE_BATCH, GRAD_ACC   micro-batch of each process and micro-batches per optimizer step, with
#                                PER_DEVICE_BATCH x NP x GRAD_ACC = TBS (the run scripts check it again in Python)
#   LAUNCH                       array: accelerate launch --config_file accelerate.yaml (NP = 1) or
#                                accelerate_ddp.yaml (NP > 1) --num_processes NP [multi-machine options]
#                                (the preset adds --main_process_port, precision options and the script)
# precision_args PRECISION sets PRECISION_ARGS, the run scripts' flags for fp32 (strict: --fp32), tf32 (--fp32
# --tf32) or bf16 (--bf16: autocast, fp32 master weights), for presets that pass the precision as flags.
# Rule: each process takes TBS / NP samples per step, in the fewest equal micro-batches of at most PER_DEVICE
# samples. With NP=1 and PER_DEVICE dividing TBS this is the reference's GRAD_ACC = TBS / PER_DEVICE; more GPUs
# first shrink GRAD_ACC, then the micro-batch. The total batch stays TBS whatever NP is (strong scaling); scale
# TBS with NP yourself for weak scaling (and then the learning rate is yours to retune).

launch_fail() {
    echo "launch setup: $*" >&2
    exit 2
}

precision_args() {
    case "$1" in
        fp32) PRECISION_ARGS=(--fp32) ;;
        tf32) PRECISION_ARGS=(--fp32 --tf32) ;;
        bf16) PRECISION_ARGS=(--bf16) ;;
        *) launch_fail "PRECISION must be fp32, tf32 or bf16, got $1" ;;
    esac
}

launch_setup() {
    NP=${NP:-1}
    NUM_MACHINES=${NUM_MACHINES:-1}
    MACHINE_RANK=${MACHINE_RANK:-0}
    local name
    for name in NP TBS PER_DEVICE NUM_MACHINES; do
        [[ "${!name:-}" =~ ^[1-9][0-9]*$ ]] || launch_fail "$name=${!name:-} must be a positive integer"
    done
    [[ "$MACHINE_RANK" =~ ^[0-9]+$ ]] && (( MACHINE_RANK < NUM_MACHINES )) \
        || launch_fail "MACHINE_RANK=$MACHINE_RANK must be in 0..$(( NUM_MACHINES - 1 ))"
    (( NP % NUM_MACHINES == 0 )) \
        || launch_fail "NP=$NP processes do not split evenly over NUM_MACHINES=$NUM_MACHINES machines"
    (( TBS % NP == 0 )) \
        || launch_fail "TBS=$TBS is not divisible by NP=$NP processes; choose TBS as a multiple of NP"

    local per_process=$(( TBS / NP ))
    GRAD_ACC=$(( (per_process + PER_DEVICE - 1) / PER_DEVICE ))  # fewest micro-batches of <= PER_DEVICE ...
    while (( per_process % GRAD_ACC != 0 )); do                  # ... that split TBS / NP into equal parts
        GRAD_ACC=$(( GRAD_ACC + 1 ))
    done
    PER_DEVICE_BATCH=$(( per_process / GRAD_ACC ))

    local local_processes=$(( NP / NUM_MACHINES )) visible=""
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        visible=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .) || true
    elif command -v nvidia-smi > /dev/null 2>&1; then
        visible=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU') || true
    fi
    if (( local_processes > 1 )) && [ -n "$visible" ] && (( local_processes > visible )); then
        # a warning, not an error: the command may be meant for another machine (or printed with DRY_RUN)
        echo "launch setup: warning: NP=$NP over $NUM_MACHINES machine(s) needs $local_processes GPUs per machine," \
             "this one shows $visible" >&2
    fi

    if (( NP == 1 )); then
        LAUNCH=(accelerate launch --config_file accelerate.yaml --num_processes 1)
    else
        LAUNCH=(accelerate launch --config_file accelerate_ddp.yaml --num_processes "$NP")
    fi
    if (( NUM_MACHINES > 1 )); then
        [ -n "${MAIN_PROCESS_IP:-}" ] || launch_fail "NUM_MACHINES=$NUM_MACHINES needs MAIN_PROCESS_IP (machine 0's address)"
        LAUNCH+=(--num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" --main_process_ip "$MAIN_PROCESS_IP")
    fi
    echo "launch: NP=$NP (machines $NUM_MACHINES) x per-device batch $PER_DEVICE_BATCH x grad_acc $GRAD_ACC = total batch $TBS" >&2
}
