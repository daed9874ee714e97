#!/usr/bin/env bash
# Train campaign runs on a lent GPU (the device tool) and bring the weights back. Four steps:
#
#   here:    bash scripts/device_campaign.sh prepare sdnunet-polyps      # pack data + start weights, weights out of the index
#   device:  run(command="bash scripts/device_campaign.sh train 6 sdnunet-polyps", carry=[".pack"], timeout_s=590)
#            (BENCH=1 bash ... train 3 ...: the GPU benchmark first, then 3 minutes of training)
#   here:    bash scripts/device_campaign.sh restore                      # the index as it was
#   here:    bash scripts/device_campaign.sh import /work/.device/...     # the call's files_at; then `campaign ship`
#
# Why: a device call carries the checkout (tracked + untracked-not-ignored files) and carried folders,
# 64 MiB in all, and the shipped weights alone are ~120 MB; ../shared/data does not travel. So `prepare`
# packs what the runs need into .pack/ (git-ignored) and takes napari_sdunet/weights out of the index
# for the call (the files stay on disk); `train` copies the packed start weights into place there, runs
# `campaign run --device cuda` for at most MINUTES, and exports each run's best weights (files of
# <= 15 MiB, what the tool brings back) with its record and logs to $OUT. `import` turns them into run
# folders here; `python -m training campaign ship training/campaign.toml RUN [--partial]` then measures
# the test Dice here and ships, and a later CPU `campaign run` continues an unfinished run from them.
set -euo pipefail
cd "$(dirname "$0")/.."
TOML=training/campaign.toml
cmd="${1:-}"
shift || true
case "$cmd" in
  prepare)
    [ $# -ge 1 ] || { echo "usage: $0 prepare RUN [RUN...]" >&2; exit 2; }
    PY=.venv/bin/python
    "$PY" -m training campaign pack "$TOML" "$@" --out .pack
    if git ls-files --error-unmatch napari_sdunet/weights >/dev/null 2>&1; then
      git rm -r -q --cached napari_sdunet/weights
    fi
    grep -qx '/napari_sdunet/weights/' .git/info/exclude 2>/dev/null || echo '/napari_sdunet/weights/' >> .git/info/exclude
    tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    untracked=$(git ls-files -z --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
    pack=$(du -sb .pack | cut -f1)
    echo "travels: tracked $((tracked / 1024)) KiB + untracked ${untracked:-0} B + .pack $((pack / 1024)) KiB (limit 65536 KiB)"
    echo "now: run(command=\"bash scripts/device_campaign.sh train MINUTES $*\", carry=[\".pack\"], timeout_s=590)"
    echo "then: bash scripts/device_campaign.sh restore   (even if the call fails)"
    ;;
  train)
    [ $# -ge 2 ] || { echo "usage: $0 train MINUTES RUN [RUN...]" >&2; exit 2; }
    minutes="$1"; shift
    PY="${PY:-python3}"
    OUT="${OUT:-/tmp/device-out}"
    DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this step on a machine without a GPU
    mkdir -p "$OUT" napari_sdunet/weights
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    cp -r .pack/weights/. napari_sdunet/weights/
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
      "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    } 2>&1 | tee "$OUT/device.log"
    # the Triton sweep has never run on a GPU before: check it against the reference first (< 3 min);
    # if it fails, the runs take the eager loop (slower, the same maths)
    if [ "$DEVICE" = cuda ] && ! timeout 170 "$PY" -m pytest -q -x -c /dev/null --rootdir . -p no:cacheprovider \
        tests/models/test_sweep_triton.py >> "$OUT/device.log" 2>&1; then
      echo "Triton sweep check failed: training with NAPARI_SDUNET_SWEEP=loop" | tee -a "$OUT/device.log"
      export NAPARI_SDUNET_SWEEP=loop
    fi
    # BENCH=1: also the GPU benchmark of issue 13 (sweeps and training steps, < 4 min) before training
    if [ "${BENCH:-0}" = 1 ] && [ "$DEVICE" = cuda ]; then
      timeout 230 "$PY" benchmarks/bench_sdn.py --device cuda --repeats 5 --repeats-96 3 --step-repeats 3 \
          --impls loop triton triton_bf16 --step-impls auto loop --json "$OUT/bench_gpu.json" \
          > "$OUT/bench_gpu.md" 2>&1 || echo "benchmark: exit $?" | tee -a "$OUT/device.log"
    fi
    runs=$(IFS=,; echo "$*")
    status=0
    "$PY" -m training campaign run "$TOML" --only "$@" --device "$DEVICE" --pack .pack --no-ship \
        --runs-dir /tmp/campaign-runs --max-minutes "$minutes" 2>&1 | tail -c 200000 >> "$OUT/device.log" || status=1
    half=(); [ $# -gt 1 ] && half=(--half)  # the tool brings back 8 files: fp16 when several runs come back
    "$PY" -m training campaign export "$TOML" "$@" --runs-dir /tmp/campaign-runs --out "$OUT" "${half[@]}" \
        2>&1 | tee -a "$OUT/device.log" || status=1
    echo "runs $runs: exit $status" | tee -a "$OUT/device.log"
    tail -25 "$OUT/device.log"
    exit $status
    ;;
  restore)
    git reset -q -- napari_sdunet/weights
    if [ -f .git/info/exclude ]; then
      grep -vx '/napari_sdunet/weights/' .git/info/exclude > .git/info/exclude.tmp || true
      mv .git/info/exclude.tmp .git/info/exclude
    fi
    git status --short napari_sdunet/weights | head
    echo "index restored"
    ;;
  import)
    [ $# -eq 1 ] || { echo "usage: $0 import FOLDER" >&2; exit 2; }
    .venv/bin/python -m training campaign import "$TOML" "$1"
    ;;
  *)
    echo "usage: $0 prepare RUN... | train MINUTES RUN... | restore | import FOLDER" >&2
    exit 2
    ;;
esac
