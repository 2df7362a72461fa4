# CUDA MPS for the runs of a sitting that share one GPU (sourced, not run):
#   source bench/_mps.sh && mps_start python3 && trap mps_stop EXIT
# Processes sharing a GPU without MPS take turns on it, so the small kernels of the matrix's models may leave much of it
# idle; through one MPS server the kernels of several runs can run side by side (and a fatal GPU error in one of them
# ends them all). mps_start PYTHON starts the MPS control daemon (pipe and log folders under MPS_DIR
# [/tmp/gradmem_mps]; one already running there is reused, as a daemon outlives the command that started it),
# checks that PYTHON's torch runs a CUDA op through it (MPS_CHECK_S [60] seconds at most), then exports
# CUDA_MPS_PIPE_DIRECTORY and CUDA_MPS_LOG_DIRECTORY, so the runs started after it use the server (where the driver
# cannot reach the daemon it runs a process without MPS). Where the daemon is missing or the check fails it says why,
# quits the daemon and returns 1 with the environment as it was: the runs then share the GPU without MPS. mps_stop
# quits the daemon.
_mps_env() {  # a command with the daemon's folders under MPS_DIR
    env CUDA_MPS_PIPE_DIRECTORY="$MPS_DIR/pipe" CUDA_MPS_LOG_DIRECTORY="$MPS_DIR/log" "$@"
}

_mps_ctl() {  # one command to the daemon (10 s at most)
    echo "$1" | _mps_env timeout 10 nvidia-cuda-mps-control
}

mps_start() {
    MPS_DIR=${MPS_DIR:-/tmp/gradmem_mps}
    command -v nvidia-cuda-mps-control >/dev/null \
        || { echo "mps: nvidia-cuda-mps-control is not on PATH; the runs share the GPU without MPS" >&2; return 1; }
    mkdir -p "$MPS_DIR/pipe" "$MPS_DIR/log"
    local pid_file="$MPS_DIR/pipe/nvidia-cuda-mps-control.pid"  # the daemon writes it
    if ! { [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; }; then
        _mps_env nvidia-cuda-mps-control -d \
            || { echo "mps: nvidia-cuda-mps-control -d failed; the runs share the GPU without MPS" >&2; return 1; }
    fi
    local check="import torch; x = torch.ones(8, device='cuda'); assert (x + 1).sum().item() == 16"
    if _mps_env timeout "${MPS_CHECK_S:-60}" "$1" -c "$check"; then
        local servers
        servers=$(_mps_ctl get_server_list 2>/dev/null)
        export CUDA_MPS_PIPE_DIRECTORY="$MPS_DIR/pipe" CUDA_MPS_LOG_DIRECTORY="$MPS_DIR/log"
        if [ -n "$servers" ]; then
            echo "mps: on (server $servers; $MPS_DIR)"
        else  # the driver falls back to no MPS where it cannot use the daemon, as the check's op may have done
            echo "mps: the daemon runs but lists no server after a CUDA op: the runs may not use it ($MPS_DIR/log)"
        fi
        return 0
    fi
    echo "mps: a CUDA op through the daemon failed or took over ${MPS_CHECK_S:-60} s (log: $MPS_DIR/log)" >&2
    _mps_ctl quit >/dev/null 2>&1
    echo "mps: daemon quit; the runs share the GPU without MPS" >&2
    return 1
}

mps_stop() {
    [ -n "${CUDA_MPS_PIPE_DIRECTORY:-}" ] || return 0
    _mps_ctl quit >/dev/null 2>&1
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
}
