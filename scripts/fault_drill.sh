#!/usr/bin/env bash
# Fault drill: kill -9 a batch inference and a training run in the middle, then show what survived and finish them.
# Usage: scripts/fault_drill.sh [WORKDIR]   (default: a new temporary folder; needs `make install` first)
set -euo pipefail
cd "$(dirname "$0")/.."
CLI=${CLI:-.venv/bin/covid-monai}
PY=${PY:-.venv/bin/python}
WORK=${1:-$(mktemp -d -t covid_monai_drill.XXXXXX)}
mkdir -p "$WORK"
echo "drill folder: $WORK"

wait_for() {  # wait_for PID TEST-COMMAND...: poll until the test passes; fail if PID dies first
  local pid=$1; shift
  until "$@"; do
    kill -0 "$pid" 2>/dev/null || { echo "process $pid ended before the kill point" >&2; exit 1; }
    sleep 0.05
  done
}

echo "== preparing phantoms and a short training set"
$CLI phantom "$WORK/train" --n 6 --shape 64 64 16 --seed 1 >/dev/null
$CLI phantom "$WORK/scans" --n 10 --shape 96 96 24 --seed 100 >/dev/null

echo "== drill 1: kill -9 during training (after the first epoch's checkpoint)"
KNOBS=(--epochs 8 --val_interval 2 --network_width 4 --pixdim "[4.0, 4.0, -1]" --patch_size "[48, 48]"
       --num_samples 2 --num_workers 0)
$CLI train --data "$WORK/train" --out "$WORK/bundle" --device cpu "${KNOBS[@]}" >"$WORK/train.log" 2>&1 &
PID=$!
wait_for $PID test -f "$WORK/bundle/models/latest.pt"
kill -9 $PID; wait $PID 2>/dev/null || true
echo "killed training (pid $PID); surviving files:"; ls -la "$WORK/bundle/models"
$PY - "$WORK/bundle/models/latest.pt" <<'PYEOF'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["trainer"]
print(f"latest.pt loads: epoch {state['iteration'] // state['epoch_length']} of {state['max_epochs']} saved")
PYEOF
$CLI train --data "$WORK/train" --out "$WORK/bundle" --device cpu --resume "${KNOBS[@]}" >>"$WORK/train.log" 2>&1
$PY - "$WORK/bundle/models/latest.pt" <<'PYEOF'
import sys, torch
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["trainer"]
print(f"after --resume: epoch {state['iteration'] // state['epoch_length']} of {state['max_epochs']}")
PYEOF

echo "== drill 2: kill -9 during batch inference (after the third mask)"
$CLI infer "$WORK/scans/images" -o "$WORK/masks" --bundle "$WORK/bundle" --device cpu --quiet --workers 0 --lungs \
  >"$WORK/infer.log" 2>&1 &
PID=$!
wait_for $PID bash -c "[ \$(ls '$WORK/masks' 2>/dev/null | grep -c '_infection.nii.gz$') -ge 3 ]"
kill -9 $PID; wait $PID 2>/dev/null || true
echo "killed inference (pid $PID); surviving files:"; ls -a "$WORK/masks"
$PY - "$WORK/masks" <<'PYEOF'
import json, sys
from pathlib import Path
import nibabel as nib
import numpy as np
out = Path(sys.argv[1])
masks = sorted(out.glob("*_infection.nii.gz"))
for path in masks:
    np.asarray(nib.load(str(path)).dataobj)  # raises if torn
print(f"{len(masks)} complete masks, all load; summary.json lists {len(json.loads((out / 'summary.json').read_text())['cases'])} cases")
print("temporary files left by the kill:", [p.name for p in out.iterdir() if p.name.startswith(".")])
PYEOF
$CLI infer "$WORK/scans/images" -o "$WORK/masks" --bundle "$WORK/bundle" --device cpu --quiet --workers 0 --lungs
echo "statuses after the re-run:"; cut -d, -f1,3 "$WORK/masks/summary.csv"
echo "temporary files now: $(ls -a "$WORK/masks" | grep -c '^\.[^.]' || true)"
