#!/usr/bin/env bash
# The device check (issue #20): on a lent GPU machine, from the repository root, with the
# wheels of scripts/device-wheels.sh carried in .whl/. Installs protoserve over the
# machine's own torch (--no-deps), runs the GPU tests (marker `gpu`) and the GPU bench
# (bench/gpu.py), and writes what it found under $OUT (or ./device-out here):
#   device-check.log, gpu-tests.txt, <date>-gpu.md and .json (copy the last two into
#   bench/results/ from what the device tool returns).
# One call of the device tool, well inside its 10 minutes:
#   run(command="bash scripts/device-check.sh", carry=[".whl"], timeout_s=540)
# Anywhere without CUDA it runs the same steps on the CPU, to check the script itself:
#   PYTHON=.nox/tests/bin/python PROTOSERVE_WHEELS=none bash scripts/device-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-$PWD/device-out}
mkdir -p "$out"
exec > >(tee "$out/device-check.log") 2>&1
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
status=0

echo "== install (no network: the carried wheels, then protoserve without its dependencies)"
site=/tmp/protoserve-site
rm -rf "$site"
wheels=${PROTOSERVE_WHEELS:-.whl}  # "none": use the packages this Python has (a dry run)
if [ "$wheels" != none ]; then
  # protoserve's own wheel among them (scripts/device-wheels.sh builds it): no build here.
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "$wheels"/*.whl || exit 2
else
  "$python" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target "$site" . || exit 2
fi
export PYTHONPATH="$site"
"$python" - <<'PY' || exit 2
import grpc, google.protobuf, torch
import protoserve.server, protoserve.gateway
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("grpcio", grpc.__version__, "protobuf", google.protobuf.__version__)
PY

echo "== GPU tests (marker gpu; they skip, with the reason, without CUDA)"
"$python" -m pytest -q -p no:cacheprovider -m gpu -rs tests/server 2>&1 | tee "$out/gpu-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== GPU bench (bench/gpu.py)"
quick=()
"$python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || quick=(--quick)
(cd bench && "$python" gpu.py --out "$out" "${quick[@]}") || status=1
echo "== done: status $status"
# Only $OUT comes back from the lent machine: commit bench/results/<date>-gpu.md from
# the files the tool returns. Let tee write the last lines before the script ends.
exec >&- 2>&-
wait
exit $status
