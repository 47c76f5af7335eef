# Sourced by tools/gpu_check.sh and tools/gpu_check_deepspeed.sh (after PY and fail are defined): installs this
# checkout of memtrain, editable and without dependencies, into a GPU machine's Python that has torch but not
# memtrain. A bare checkout on PYTHONPATH is not enough: pyproject.toml maps the top-level kernels/ folder to
# memtrain.kernels. With no package index reachable, the build backend (setuptools>=77) comes from .whl/:
#   python -m pip download --no-deps -d .whl 'setuptools>=77'
memtrain_install() {
  "$PY" -c "import memtrain.kernels.dispatch" 2>/dev/null && return 0
  "$PY" -m pip install -q --no-deps --no-index --find-links .whl -e . 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || { fail "installing memtrain (pip install -e .; put a setuptools>=77 wheel into .whl/)"; return 1; }
}
