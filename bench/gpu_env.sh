# Sourced by the GPU scripts: wheels from .whl/ (packages a lent machine lacks), PYTHONPATH, $OUT.
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench-gpu}
mkdir -p "$OUT"
W=$(( $(nproc) - 2 ))
