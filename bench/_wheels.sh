# Wheels a bare GPU machine lacks, for the sittings (sourced, not run):
#   source bench/_wheels.sh && install_wheels python3
# install_wheels PYTHON: when .whl/ exists and PYTHON cannot import datasets, install .whl/*.whl (datasets, dill,
# multiprocess, carried by the device call) into /tmp/site and put it on PYTHONPATH.
install_wheels() {
    [ -d .whl ] && ! "$1" -c "import datasets" 2>/dev/null || return 0
    "$1" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}
