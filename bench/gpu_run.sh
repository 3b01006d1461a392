#!/usr/bin/env bash
# The issue-9 GPU run of 2026-11-23 as it was launched on the device machine (one H100), in the background, after the CIFAR-10
# shards were copied to DATA one per call (the transfer limit). Everything runs from a copy of the repo in RUN/src
# (the working tree is laid anew on each call) and writes to RUN; RUN/progress.log says what is running.
#
#   setsid nohup bash bench/gpu_run.sh $HOME/cifar10 $HOME/run > $HOME/run.log 2>&1 &
#
# Budget: the device time of one session (30 min, start and transfers included), so compiles start no later than
# --deadline seconds after the ResNet-20 bench starts, and the analog and PD-QAT benches run beside it.
set -u
DATA=$1
RUN=$2
mkdir -p "$RUN"
rm -rf "$RUN/src" && mkdir -p "$RUN/src" && tar cf - --exclude=./.cifar --exclude=./.whl . | tar xf - -C "$RUN/src"
cd "$RUN/src" || exit 1
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 OMP_NUM_THREADS=2  # 13 GPU processes share 16 cores
# a plain (non-editable) install of this tree; PuLP and highspy came as wheels into a folder on PYTHONPATH
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$RUN/site" . || exit 1
export PYTHONPATH="$RUN/site:${PYTHONPATH:-}"
nvidia-smi > "$RUN/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0))" \
    > "$RUN/versions.txt" 2>&1
echo "start $(date -u +%T)" >> "$RUN/progress.log"

python3 bench/bench_cifar.py --device cuda --data "$DATA" --fp-epochs 100 --qat-epochs 15 --jobs 8 \
    --qat-lrs 0.01,0.005,0.002,0.001 --deadline "${CIFAR_DEADLINE:-720}" --out "$RUN/cifar" > "$RUN/cifar.log" 2>&1 &
CIFAR=$!

wait_fp() { while [ ! -f "$RUN/cifar/fp.done" ]; do
    kill -0 "$CIFAR" 2>/dev/null || return 1; sleep 3; done; }

( wait_fp && echo "fp done $(date -u +%T)" >> "$RUN/progress.log" \
  && python3 bench/bench_analog.py --model "$RUN/cifar/resnet20_fp.pt" --arch mpqc.compiler.zoo:resnet20 \
       --data "cifar10:$DATA" --device cuda --seeds 3 --all-analog --out "$RUN/analog_all" > "$RUN/analog_all.log" 2>&1
  echo "analog_all exit $? $(date -u +%T)" >> "$RUN/progress.log" ) &

( wait_fp && python3 bench/bench_analog.py --model "$RUN/cifar/resnet20_fp.pt" --arch mpqc.compiler.zoo:resnet20 \
       --data "cifar10:$DATA" --device cuda --seeds 3 --train-ebars 0 --out "$RUN/analog" > "$RUN/analog.log" 2>&1
  echo "analog exit $? $(date -u +%T)" >> "$RUN/progress.log" ) &

( python3 bench/bench_pdqat.py --device cuda --data "$DATA" --fp-epochs "${PDQAT_FP_EPOCHS:-30}" \
       --qat-epochs "${PDQAT_QAT_EPOCHS:-8}" --jobs 3 --out "$RUN/pdqat" > "$RUN/pdqat.log" 2>&1
  echo "pdqat exit $? $(date -u +%T)" >> "$RUN/progress.log" ) &

wait "$CIFAR"
echo "cifar exit $? $(date -u +%T)" >> "$RUN/progress.log"
wait
echo "all done $(date -u +%T)" >> "$RUN/progress.log"

# what comes back (run from the device call that collects):
#   cd $RUN && tar czf $OUT/run.tgz --exclude=src --exclude=site --exclude=finetune_ckpt --exclude=.cache \
#       --exclude='*.pt' --exclude=data .
