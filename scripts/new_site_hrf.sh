#!/usr/bin/env bash
# Local distillation at a new site, measured: HRF (Canon CR-1, 45 degrees) as the hospital's own camera.
#
#   bash scripts/new_site_hrf.sh SHARED_DATA OUT
#
# The fixed split is HRF's source split (cases.json): the 24 "training" photographs are the site's unlabelled images
# (their masks are never read), the 21 "test" photographs are the labelled held-out half. Steps:
#   1. teacher_dc: a teacher on DRIVE training + CHASE_DB1 children 01-10 (two cameras), 50 CPU minutes, calibrated on
#      its own validation cases;
#   2. every teacher candidate (shipped teacher, teacher_dc, ensembles with flips) and the shipped student evaluated on
#      the HRF test half, DRIVE test and CHASE_DB1 test (children 11-14);
#   3. the shipped student distilled locally (half of each batch from the unlabelled HRF half, half from labelled DRIVE,
#      kd=1, 12 CPU minutes) from the shipped teacher and from teacher_dc, and from teacher_dc for 25 minutes and with
#      its soft labels stored once per photograph (--teacher-targets stored, 12 minutes, seeds 0-2); evaluated the same way.
# Results: OUT/*.json (kdseg evaluate) and OUT/summary.txt.
set -euo pipefail
SHARED=${1:?shared data folder (holding retina/)}; OUT=${2:?output folder}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE/KDSegmentation${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
R=$SHARED/retina; M=$HERE/Resources/Models; mkdir -p "$OUT"
kdseg() { python3 -m KDSegmentationLib "$@"; }

# folders of links (scripts/retina_sets.py): DRIVE + CHASE 01-10, the unlabelled HRF half; the HRF test ids
DC=$OUT/DRIVE_CHASE; UNL=$OUT/HRF_unlabelled
IDS=$(python3 "$HERE/scripts/retina_sets.py" "$R" "$OUT")

T=$OUT/retina_teacher_dc.kdseg.pt
if [ ! -f "$T" ]; then
  kdseg train-teacher --task retina --data "$DC" --arch-args '{"filters": [16, 32, 64, 128, 256]}' --patch 128,128 \
    --batch-size 8 --val-fraction 0.15 --val-every 150 --seed 1 --max-minutes 50 --device cpu --output "$T" \
    --progress json > "$T.log"
  kdseg calibrate --model "$T" --data "$DC" --device cpu
fi

evaluate() {  # TAG MODEL
  kdseg evaluate --task retina --data "$R/HRF" --cases "$IDS" --model "$2" --device cpu --output "$OUT/$1_hrf.json" >/dev/null
  kdseg evaluate --task retina --data "$R/DRIVE" --split test --model "$2" --device cpu --output "$OUT/$1_drive.json" >/dev/null
  kdseg evaluate --task retina --data "$R/CHASE_DB1" --split test --model "$2" --device cpu --output "$OUT/$1_chase.json" >/dev/null
}
evaluate student "$M/retina_student.kdseg.pt"
evaluate teacher "$M/retina_teacher.kdseg.pt"
evaluate student+teacher "$M/retina_student.kdseg.pt,$M/retina_teacher.kdseg.pt"
evaluate teacher+flips "$M/retina_teacher.kdseg.pt,$M/retina_teacher.kdseg.pt"   # one model twice: its flips alone
evaluate teacher_dc "$T"
evaluate teacher_dc+teacher "$T,$M/retina_teacher.kdseg.pt"

distil() {  # TAG TEACHER MINUTES [MORE DISTILL OPTIONS...]
  local S=$OUT/retina_student_local_hrf_$1.kdseg.pt teacher=$2 minutes=$3; shift 3
  [ -f "$S" ] || kdseg distill --task retina --data "$R/DRIVE" --patch 128,128 --batch-size 8 --val-fraction 0.15 \
    --val-every 150 --losses kd=1 --alpha 0.5 --temperature 2 --seed 0 --unlabelled "$UNL" --unlabelled-fraction 0.5 \
    --init "$M/retina_student.kdseg.pt" --teacher "$teacher" --max-minutes "$minutes" --lr 5e-4 --output "$S" \
    --device cpu --progress json "$@" > "$S.log"
  evaluate "local_$1" "$S"
}
distil t0 "$M/retina_teacher.kdseg.pt" 12
distil tdc "$T" 12
# the teacher on every patch (online) against its soft labels computed once per photograph (stored), same budgets
distil tdc25 "$T" 25
distil tdc_stored "$T" 12 --teacher-targets stored
for seed in 1 2; do  # two more seeds of the 12-minute run with stored soft labels
  distil "tdc_stored_s$seed" "$T" 12 --teacher-targets stored --seed "$seed"
done

panel() {  # TAG TEACHER: local distillation as the Slicer panel runs it: the site's unlabelled photographs alone,
  # the shipped student as the start, soft labels stored once, 10 minutes, the engine's defaults otherwise
  local S=$OUT/retina_student_panel_hrf_$1.kdseg.pt
  [ -f "$S" ] || kdseg distill --task retina --teacher "$2" --data "$UNL" --output "$S" --alpha 0.5 --temperature 2 \
    --max-minutes 10 --init "$M/retina_student.kdseg.pt" --teacher-targets stored --seed 0 --device cpu \
    --progress json > "$S.log"
  evaluate "panel_$1" "$S"
}
panel t0 "$M/retina_teacher.kdseg.pt"
panel tdc "$T"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print(f"{'model':28s} {'set':6s} {'n':>3s} {'Dice':>7s} {'prec':>7s} {'recall':>7s} {'AUC':>7s}")
for f in sorted(out.glob("*_*.json")):
    r = json.loads(f.read_text()); m = r["mean"]["Retinal vessels"]
    tag, _, where = f.stem.rpartition("_")
    print(f"{tag:28s} {where:6s} {r['n_cases']:3d} " + " ".join(f"{m[k]['mean']:7.4f}" for k in ("dice", "precision", "recall", "auc")))
for f in sorted(out.glob("retina_student_*_hrf_*.kdseg.pt.report.json")):
    card = json.loads(f.read_text())["card"]
    print(f"{f.name.split('.')[0]:40s} steps {card['recipe']['steps']:5d}, {card['step_time_s']:.3f} s/step, "
          f"teacher targets {card['recipe'].get('teacher_targets')}, {card['training_time_s'] / 60:.1f} min")
PY
