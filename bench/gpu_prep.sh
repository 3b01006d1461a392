#!/usr/bin/env bash
# Everything the issue-9 GPU run needs that can be done here, at no device time: the CIFAR-10 shards in .cifar/ and
# the PuLP and highspy wheels for the device's Python 3.12 in .whl/ (both git-ignored, so they travel only when a
# call carries them), then the four device calls of bench/gpu_run.sh, printed with the sizes checked against the
# 64 MiB a call may carry.
#
#   bash bench/gpu_prep.sh [CIFAR_DIR]       # default ../shared/data/cifar10
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:-../shared/data/cifar10}
for f in test.npz train-0.npz train-1.npz train-2.npz; do
  [ -f "$SRC/$f" ] || { echo "gpu_prep: $SRC/$f not found; pass the CIFAR-10 folder (test.npz, train-N.npz)" >&2; exit 2; }
done
mkdir -p .cifar .whl
for f in test.npz train-0.npz train-1.npz train-2.npz; do cmp -s "$SRC/$f" ".cifar/$f" || cp "$SRC/$f" .cifar/; done
# the versions pyproject admits and the device lacks (its image has no PuLP); --no-deps: their needs are there
ls .whl/pulp-3.3.2-*.whl .whl/highspy-1.15.1-*.whl > /dev/null 2>&1 || python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl pulp==3.3.2 highspy==1.15.1
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
mib() { echo $(( ($1 + 1048575) / 1048576 )); }
size() { du -cb "$@" | tail -1 | cut -f1; }
first=$(( tree + $(size .whl .cifar/test.npz) ))
for f in train-0 train-1 train-2; do
  n=$(( tree + $(size ".cifar/$f.npz") ))
  [ "$n" -le 67108864 ] || { echo "gpu_prep: a call with .cifar/$f.npz carries $(mib "$n") MiB > 64" >&2; exit 1; }
done
[ "$first" -le 67108864 ] || { echo "gpu_prep: call 1 carries $(mib "$first") MiB > 64" >&2; exit 1; }
cat <<EOF
Ready: .cifar/ and .whl/ (call 1 carries $(mib "$first") MiB, calls 2-4 about $(mib $(( tree + 47500000 ))) MiB each).
Device calls, one right after the other (the machine goes back 30 s after a call):
 1. carry [".whl", ".cifar/test.npz"]:
    mkdir -p \$HOME/cifar10 && cp .cifar/test.npz \$HOME/cifar10/ && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target \$HOME/site .whl/*.whl && PYTHONPATH=\$HOME/site python3 -c "import pulp, highspy; print('ok')"
 2. carry [".cifar/train-0.npz"]:  cp .cifar/train-0.npz \$HOME/cifar10/ && ls \$HOME/cifar10
 3. carry [".cifar/train-1.npz"]:  cp .cifar/train-1.npz \$HOME/cifar10/ && ls \$HOME/cifar10
 4. carry [".cifar/train-2.npz"], timeout_s = BUDGET + 45, BUDGET = budget_left_s - 75 (status) or 540:
    cp .cifar/train-2.npz \$HOME/cifar10/ && BUDGET=540 bash bench/gpu_run.sh \$HOME/cifar10 \$HOME/run \$OUT
EOF
