#!/usr/bin/env bash
# The issue-9 GPU run on the device machine (one H100), sized for the lease this workplace gives now: 15 minutes of
# device time a task, start, idle time between calls and transfers included, 10 minutes a command at most.
#
# The calls (bench/gpu_prep.sh, run here first at no device time, prints them with the paths filled in):
#   1. carry .whl and .cifar/test.npz: copy the test split to $HOME/cifar10, install PuLP/highspy into $HOME/site
#   2. carry .cifar/train-0.npz: copy it out;   3. the same with train-1
#   4. carry .cifar/train-2.npz, timeout_s = BUDGET + 45: copy it out, then this script in the foreground:
#        BUDGET=... bash bench/gpu_run.sh $HOME/cifar10 $HOME/run $OUT
# Each call must follow the last within the machine's 30 s warm window, or the next starts a bare machine.
# At about 60-120 s for the start and 10-20 s a transfer call, call 4 has roughly 600 s: BUDGET defaults to 540.
#
# What runs, most important first (issue 9's goal rows; kernel-wise is the stronger plan on every CPU seed), after
# ~15 s timing the fine-tuning step alone (bench_train_step.py --qat):
#   - float ResNet-20, 100 epochs (233 s alone on the reference run; 296 s shared on 2026-11-23);
#   - then at once: W2A4 and W3A3 uniform and fisher kernel-wise at weight-alpha 0.151 (sessions 5, 11-13), 15 QAT
#     epochs each (SGD 0.02 cosine, batch statistics on: compiler/finetune/renorm.py). These are the goals not yet
#     met anywhere, so they get the GPU to themselves: six compiles at once share it and would all end late;
#   - then, once those four are done (W2A2_AFTER=0: beside them), W2A2 uniform and kernel-wise at weight-alpha 0.4
#     (sessions 12-13; its goal is met deployed on the CPU protocol), if MIN_LEFT still allows;
#   - PD-QAT (PDQAT=1) and the analog benches (ANALOG=1) only when asked: beside the goal rows they share one GPU and
#     the lease cannot hold them too. Each is a run of its own in a later lease.
# At BUDGET seconds, whatever still runs is stopped, and what finished is collected: the tables and logs go to OUTDIR
# (run.tgz with every results.json, table, plot, manifest and plan, plus resnet20_fp.pt so a later lease or a CPU
# session can start from the trained float model), and the tables are printed last, for the reply's output tail.
# No compile starts with less than MIN_LEFT (120) seconds to go.
#
# Rehearsal on any machine (every hand-off, in minutes; no GPU needed):
#   DEVICE=cpu LIMIT=512 FP_EPOCHS=1 QAT_EPOCHS=1 CIFAR_JOBS=2 W2A2_JOBS=1 BUDGET=3000 \
#       bash bench/gpu_run.sh $PWD/../shared/data/cifar10 /tmp/rehearsal /tmp/rehearsal_out
# LIMIT passes --train-limit to the CIFAR benches and --limit --quick --seeds 1 to the analog ones.
set -u
[ $# -ge 2 ] || { echo "gpu_run: usage: bash bench/gpu_run.sh CIFAR_DIR RUN_DIR [OUT_DIR]" >&2; exit 2; }
DATA=$1
RUN=$2
OUTDIR=${3:-$RUN/out}
T0=$(date +%s)
BUDGET=${BUDGET:-540}
MIN_LEFT=${MIN_LEFT:-120}
for v in BUDGET MIN_LEFT; do
  [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "gpu_run: $v=${!v} must be a whole number of seconds, e.g. $v=540" >&2; exit 2; }
done
[ -f "$DATA/test.npz" ] || { echo "gpu_run: $DATA/test.npz not found; pass the CIFAR-10 folder the calls copied" >&2; exit 2; }
mkdir -p "$RUN" "$OUTDIR"
rm -rf "$RUN/src" && mkdir -p "$RUN/src" \
    && tar cf - --exclude=./.cifar --exclude=./.whl --exclude=./.venv --exclude=./bench_out . | tar xf - -C "$RUN/src"
cd "$RUN/src" || exit 1
DEVICE=${DEVICE:-cuda}
FP_EPOCHS=${FP_EPOCHS:-100}
QAT_EPOCHS=${QAT_EPOCHS:-15}
SEED=${SEED:-0}
CL=() AL=()
if [ -n "${LIMIT:-}" ]; then CL=(--train-limit "$LIMIT"); AL=(--limit "$LIMIT" --quick --seeds 1); fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2  # up to eight GPU processes share 16 cores
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi
# a plain (non-editable) install of this tree; PuLP and highspy came as wheels into SITE (call 1)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$RUN/site" . || exit 1
export PYTHONPATH="$RUN/site:${SITE:-$HOME/site}:${PYTHONPATH:-}"
nvidia-smi > "$RUN/nvidia-smi.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" \
    > "$RUN/versions.txt" 2>&1
log() { echo "$1 $(( $(date +%s) - T0 )) s" | tee -a "$RUN/progress.log"; }
log "start"
# the fine-tuning step alone first (~15 s): the number that says how many QAT rows a lease holds
timeout 90 python3 bench/bench_train_step.py --qat --device "$DEVICE" --threads 2 --steps "${STEP_STEPS:-20}" \
    > "$RUN/qat_step.md" 2>&1
log "qat step timed"
# a bench's --deadline counts from its own start: no compile starts with less than MIN_LEFT seconds to go
left() { local s=$(( BUDGET - MIN_LEFT - ($(date +%s) - T0) )); [ "$s" -lt 1 ] && s=1; echo "$s"; }

set -m  # each background job gets a process group of its own, so the budget can stop it with its workers
python3 bench/bench_cifar.py --device "$DEVICE" --data "$DATA" --fp-epochs "$FP_EPOCHS" --qat-epochs "$QAT_EPOCHS" \
    --qat-lrs 0.02 --jobs "${CIFAR_JOBS:-4}" "${CL[@]}" \
    --plans w2a4,w3a3 --rows "${CIFAR_ROWS:-w2a4_uniform,w2a4_mixed_channel,w3a3_uniform,w3a3_mixed_channel}" \
    --weight-alpha 0.151 --seed "$SEED" --deadline "$(left)" --out "$RUN/cifar" > "$RUN/cifar.log" 2>&1 &
PIDS=($!)

wait_fp() { while [ ! -f "$RUN/cifar/fp.done" ]; do
    kill -0 "${PIDS[0]}" 2>/dev/null || return 1; sleep 2; done; }

wait_cifar() { [ "${W2A2_AFTER:-1}" = 1 ] || return 0; while kill -0 "${PIDS[0]}" 2>/dev/null; do sleep 2; done; }

( wait_fp && log "fp done" && wait_cifar && python3 bench/bench_cifar.py --device "$DEVICE" --data "$DATA" \
       --fp-model "$RUN/cifar/resnet20_fp.pt" --qat-epochs "$QAT_EPOCHS" --qat-lrs 0.02 --jobs "${W2A2_JOBS:-2}" \
       "${CL[@]}" --plans w2a2 --rows "${W2A2_ROWS:-w2a2_uniform,w2a2_mixed_channel}" \
       --weight-alpha 0.4 --seed "$SEED" --deadline "$(left)" --out "$RUN/cifar_w2a2" \
       > "$RUN/cifar_w2a2.log" 2>&1
  log "w2a2 exit $?" ) &
PIDS+=($!)

if [ "${ANALOG:-0}" = 1 ]; then
  ( wait_fp && python3 bench/bench_analog.py --model "$RUN/cifar/resnet20_fp.pt" --arch mpqc.compiler.zoo:resnet20 \
         --data "cifar10:$DATA" --device "$DEVICE" --seeds 3 "${AL[@]}" --train-ebars 0 --out "$RUN/analog" \
         > "$RUN/analog.log" 2>&1
    log "analog exit $?" ) &
  PIDS+=($!)
fi
if [ "${PDQAT:-0}" = 1 ]; then
  ( python3 bench/bench_pdqat.py --device "$DEVICE" --data "$DATA" --fp-epochs "${PDQAT_FP_EPOCHS:-30}" \
         --qat-epochs "${PDQAT_QAT_EPOCHS:-8}" --jobs "${PDQAT_JOBS:-3}" "${CL[@]}" --out "$RUN/pdqat" \
         > "$RUN/pdqat.log" 2>&1
    log "pdqat exit $?" ) &
  PIDS+=($!)
fi

# wait for every bench, or for the budget
while :; do
  alive=0
  for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && { log "all done"; break; }
  if [ $(( $(date +%s) - T0 )) -ge "$BUDGET" ]; then
    log "budget reached: stopping what still runs"
    for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done
    sleep 3
    for p in "${PIDS[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
    break
  fi
  sleep 2
done
set +m

# collect: one table over both CIFAR runs (what finished), the paired comparison, and the files
runs=()
for d in "$RUN/cifar" "$RUN/cifar_w2a2"; do [ -f "$d/results.json" ] && runs+=("$d"); done
if [ "${#runs[@]}" -gt 0 ]; then
  python3 bench/bench_cifar.py --merge "${runs[@]}" --out "$RUN/merged" > "$RUN/merge.log" 2>&1 \
    && timeout 60 python3 bench/bench_cifar.py --paired "$RUN/merged" >> "$RUN/merge.log" 2>&1
fi
log "collected"
cp "$RUN/progress.log" "$OUTDIR/" 2>/dev/null
for f in "$RUN/qat_step.md" "$RUN/merged/table.md" "$RUN/merged/paired.md"; do [ -f "$f" ] && cp "$f" "$OUTDIR/"; done
( cd "$RUN" && tar czf "$OUTDIR/run.tgz" --exclude=src --exclude=site --exclude=finetune_ckpt --exclude=.cache \
    --exclude=data --exclude='*.onnx' --exclude='model_q.pt' --exclude='*.npz' . )
echo "== progress"; cat "$RUN/progress.log"
for f in "$RUN/qat_step.md" "$RUN/cifar/fp.done" "$RUN/merged/table.md" "$RUN/merged/paired.md"; do
  [ -f "$f" ] && { echo "== $f"; cat "$f"; }
done
for l in "$RUN"/*.log; do echo "== tail $l"; tail -n 5 "$l"; done
