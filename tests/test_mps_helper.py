"""bench/_mps.sh on the CPU, with a stand-in nvidia-cuda-mps-control and a stand-in python: the runs' environment
points at the daemon only where a CUDA op went through it, and every daemon it started is told to quit."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the stand-in daemon: -d starts it (a file), stdin commands answer as the real one does, every call is logged
FAKE_CONTROL = """#!/usr/bin/env bash
state="$FAKE_STATE"
if [ "${1:-}" = -d ]; then
    echo "start $CUDA_MPS_PIPE_DIRECTORY" >> "$state/calls"
    touch "$state/running" && echo "$FAKE_DAEMON_PID" > "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid"
    exit 0
fi
read -r cmd
echo "$cmd $CUDA_MPS_PIPE_DIRECTORY" >> "$state/calls"
[ -f "$state/running" ] || { echo "Cannot find MPS control daemon process" >&2; exit 1; }
case "$cmd" in
    get_server_list) [ -f "$state/server" ] && echo 4242 ;;
    quit) rm -f "$state/running" "$state/server" "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid" ;;
esac
"""
# the stand-in python: the check's CUDA op succeeds (and starts a server) unless FAKE_CUDA_FAILS is set
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $CUDA_MPS_PIPE_DIRECTORY" >> "$FAKE_STATE/calls"
[ -z "${FAKE_CUDA_FAILS:-}" ] || exit 1
touch "$FAKE_STATE/server"
"""


def run_helper(tmp_path, script, control=True, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if control:
        (bin_dir / "nvidia-cuda-mps-control").write_text(FAKE_CONTROL)
        (bin_dir / "nvidia-cuda-mps-control").chmod(0o755)
    (bin_dir / "fake_python").write_text(FAKE_PYTHON)
    (bin_dir / "fake_python").chmod(0o755)
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_STATE": str(state), "MPS_DIR": str(tmp_path / "mps"),
           "FAKE_DAEMON_PID": str(os.getpid()), **env}
    done = subprocess.run(["bash", "-c", f"source bench/_mps.sh; {script}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    calls = (state / "calls").read_text().splitlines() if (state / "calls").exists() else []
    return done, calls


def test_on_when_a_cuda_op_goes_through_the_daemon_then_quit(tmp_path):
    pipe = str(tmp_path / "mps" / "pipe")
    done, calls = run_helper(tmp_path, 'mps_start fake_python; echo "rc=$? pipe=$CUDA_MPS_PIPE_DIRECTORY"; mps_stop; '
                                       'echo "after=${CUDA_MPS_PIPE_DIRECTORY:-unset}"')
    assert f"rc=0 pipe={pipe}" in done.stdout and "after=unset" in done.stdout, done.stderr
    assert "mps: on (server 4242" in done.stdout
    assert calls == [f"start {pipe}", f"python {pipe}", f"get_server_list {pipe}", f"quit {pipe}"]


def test_a_daemon_already_running_is_reused(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "running").touch()
    (tmp_path / "mps" / "pipe").mkdir(parents=True)
    (tmp_path / "mps" / "pipe" / "nvidia-cuda-mps-control.pid").write_text(str(os.getpid()))
    done, calls = run_helper(tmp_path, "mps_start fake_python")
    assert done.returncode == 0, done.stderr
    assert not any(call.startswith("start ") for call in calls)


def test_a_failed_cuda_op_quits_the_daemon_and_leaves_the_environment(tmp_path):
    done, calls = run_helper(tmp_path, 'mps_start fake_python; echo "rc=$? pipe=${CUDA_MPS_PIPE_DIRECTORY:-unset}"',
                             FAKE_CUDA_FAILS="1")
    assert "rc=1 pipe=unset" in done.stdout
    assert "a CUDA op through the daemon failed" in done.stderr and "without MPS" in done.stderr
    assert calls[-1].startswith("quit ") and not (tmp_path / "state" / "running").exists()


def test_no_daemon_binary_says_so_and_starts_nothing(tmp_path):
    done, calls = run_helper(tmp_path, 'mps_start fake_python; echo "rc=$? pipe=${CUDA_MPS_PIPE_DIRECTORY:-unset}"',
                             control=False)
    assert "rc=1 pipe=unset" in done.stdout
    assert "nvidia-cuda-mps-control is not on PATH" in done.stderr
    assert calls == []
