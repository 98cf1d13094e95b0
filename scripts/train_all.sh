#!/usr/bin/env bash
# Trains every shipped model (teachers, distilled students) and the runs behind the model cards' KD ablation and
# local-distillation result, with the project's own commands, on a 2-core CPU (no GPU): two runs at a time, one
# thread each. On a GPU raise the budgets (MINUTES_SCALE) and patch/batch sizes; the recipe stays the same.
#
#   bash scripts/train_all.sh STEP DATA_ROOT OUT_DIR
#
# STEP: all, or one of retina_teacher, lung_nodule_teacher, retina_student, lung_nodule_student, liver (the shipped
# pair, all nine cases), liver_cv FOLD..., liver_teacher FOLD|all...,
# liver_student[_no_unlabelled|_instance_norm] FOLD|all...,
# ablation TASK, local_distill (after the students), calibrate ORIGINAL_DATA_ROOT (decision
# thresholds of the 2D models; 'all' reads it from $ORIGINAL_DATA), labels_only TASK (the full-budget
# comparison without the teacher).
# DATA_ROOT holds each dataset or its prepared cache ('kdseg prepare'): RadCT (RadCTTACEomics case folders), HCC_TACE
# (unlabelled_HCC-TACE-Seg), LIDC (LIDC-IDRI-slices), and the retina sets DRIVE_CHASE (DRIVE training + CHASE_DB1
# children 01-10) and HRF_unlabelled (HRF's training half, no masks), made by
# 'python scripts/retina_sets.py SHARED/retina DATA_ROOT'.
# MINUTES_SCALE (default 1) scales every time budget.
set -euo pipefail
STEP=${1:?step}; DATA=${2:?data root}; OUT=${3:?output folder}
SCALE=${MINUTES_SCALE:-1}; DEVICE=${DEVICE:-cpu}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE/KDSegmentation${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
if [ "$STEP" = all ]; then   # checked now rather than after the training
  : "${ORIGINAL_DATA:?set ORIGINAL_DATA to the folder holding lung/LIDC-IDRI-slices}"
fi
m() { python3 -c "print(round($1*$SCALE, 3))"; }
kd() { local log=$1; shift; python3 -m KDSegmentationLib "$@" --device "$DEVICE" --progress json \
         > "$OUT/$log.log" 2>&1 || echo "FAILED: $log (see $log.log)" | tee -a "$OUT/failures.txt"; }
student_args() { python3 -c "import json; from KDSegmentationLib.models.networks import default_arch_args as d; \
print(json.dumps(d('$1', 'student')[1]))"; }
KD="--losses kd=1 --alpha 0.5 --temperature 2"
# CPU-sized teachers for the 2D tasks (about 2M parameters, still >= 20x their students)
T2D='{"filters": [16, 32, 64, 128, 256]}'
RET="--data $DATA/DRIVE_CHASE --patch 128,128 --batch-size 8 --val-fraction 0.15 --val-every 150"
LUNG="--data $DATA/LIDC --patch 96,96 --batch-size 16 --soft-labels --val-every 300"
# liver: 3-fold cross-validation by case (each fold's teacher and student never see its three cases, not even for
# checkpoint selection: the last checkpoint is kept), then the shipped models with the same recipe on all nine
LIV="--data $DATA/RadCT --val-every 100000000 --patch 32,64,64 --batch-size 2"
STORED="--teacher-targets stored"   # the teacher's soft labels computed once per training image
LIV_KD=$STORED
LIV_UNLABELLED="--unlabelled $DATA/HCC_TACE --unlabelled-fraction 0.25"

retina_teacher() {
  kd retina_teacher train-teacher --task retina $RET --arch-args "$T2D" --seed 1 --max-minutes "$(m 50)" \
     --output "$OUT/retina_teacher.kdseg.pt"
}
lung_nodule_teacher() {
  kd lung_nodule_teacher train-teacher --task lung_nodule $LUNG --arch-args "$T2D" --seed 0 --max-minutes "$(m 20)" \
     --output "$OUT/lung_nodule_teacher.kdseg.pt"
}
retina_student() {
  kd retina_student distill --task retina $RET $KD --seed 0 --teacher "$OUT/retina_teacher.kdseg.pt" $STORED \
     --max-minutes "$(m 20)" --output "$OUT/retina_student.kdseg.pt"
}
lung_nodule_student() {
  kd lung_nodule_student distill --task lung_nodule $LUNG $KD --seed 0 --teacher "$OUT/lung_nodule_teacher.kdseg.pt" \
     --max-minutes "$(m 20)" --output "$OUT/lung_nodule_student.kdseg.pt"
}
# FOLD is 0, 1 or 2 (a cross-validation fold: its teacher and student never see its three cases) or all (the shipped
# models, all nine cases); the student learns from the unlabelled CTs of another hospital through the teacher alone
liver_split() { if [ "$1" = all ]; then echo "--val-fraction 0"; else echo "--folds 3 --fold $1"; fi; }
liver_dir() { if [ "$1" = all ]; then echo "$OUT"; else echo "$OUT/liver_cv/fold$1"; fi; }
liver_log() { if [ "$1" = all ]; then echo "$2"; else echo "cv$1_$2"; fi; }
liver_teacher() {   # FOLD...
  for f in "$@"; do
    mkdir -p "$(liver_dir $f)"
    kd "$(liver_log $f liver_teacher)" train-teacher --task liver $LIV $(liver_split $f) --seed 0 \
       --max-minutes "$(m 24)" --output "$(liver_dir $f)/liver_teacher.kdseg.pt"
  done
}
liver_student_as() {   # NAME UNLABELLED_ARGS FOLD...: a student distilled from its fold's teacher
  local name=$1 unlabelled=$2; shift 2
  for f in "$@"; do
    kd "$(liver_log $f $name)" distill --task liver $LIV $(liver_split $f) $KD --seed 0 \
       --teacher "$(liver_dir $f)/liver_teacher.kdseg.pt" $LIV_KD $unlabelled --max-minutes "$(m 15)" \
       --output "$(liver_dir $f)/$name.kdseg.pt"
  done
}
liver_student() {   # FOLD... (after its teacher)
  liver_student_as liver_student "$LIV_UNLABELLED" "$@"
}
liver_student_no_unlabelled() {   # FOLD...: the same student without the other hospital's CTs, for comparison
  liver_student_as liver_student_no_unlabelled "" "$@"
}
liver_student_instance_norm() {   # FOLD...: the same student with instance instead of batch normalisation
  liver_student_as liver_student_instance_norm "$LIV_UNLABELLED --arch-args {\"norm\":\"instance\"}" "$@"
}
liver_cv() {   # FOLD...: cross-validation folds (0 1 2)
  for f in "$@"; do liver_teacher $f; liver_student $f; done
}
liver() {   # the shipped liver models: all nine cases
  liver_teacher all; liver_student all
}
args2d() { if [ "$1" = retina ]; then echo "$RET"; else echo "$LUNG"; fi; }   # the data/patch arguments of a 2D task
labels_only() {   # TASK...: the shipped student's architecture, data and budget, trained on the labels alone
  for task in "$@"; do
    kd ${task}_student_labels_only train-teacher --task $task $(args2d $task) --seed 0 --arch student_mobile \
       --arch-args "$(student_args $task)" --max-minutes "$(m 20)" --output "$OUT/${task}_student_labels_only.kdseg.pt"
  done
}
ablation() {   # TASK: same student, same (short) budget and seeds, with and without the teacher
  local A M
  for task in "$@"; do
    A=$(args2d $task)
    if [ $task = retina ]; then M=1.25; else M=3; fi
    for s in 0 1 2; do
      kd abl_${task}_seg_$s train-teacher --task $task $A --seed $s --arch student_mobile \
         --arch-args "$(student_args $task)" --max-minutes "$(m $M)" --output "$OUT/ablation_$task/seg_seed$s.kdseg.pt"
      kd abl_${task}_kd_$s distill --task $task $A $KD --seed $s --teacher "$OUT/${task}_teacher.kdseg.pt" \
         --max-minutes "$(m $M)" --output "$OUT/ablation_$task/kd_seed$s.kdseg.pt"
    done
  done
}
local_distill() {   # local distillation: the shipped retina student adapts to a third camera (HRF) from its
  # unlabelled photographs, half of each batch, the labelled training photographs the other half
  kd retina_student_local_hrf distill --task retina $RET $KD --seed 0 --unlabelled "$DATA/HRF_unlabelled" \
     --unlabelled-fraction 0.5 --init "$OUT/retina_student.kdseg.pt" --teacher "$OUT/retina_teacher.kdseg.pt" \
     $STORED --max-minutes "$(m 12)" --lr 5e-4 --output "$OUT/retina_student_local_hrf.kdseg.pt"
}
calibrate() {   # ORIGINAL_DATA_ROOT (lung/LIDC-IDRI-slices): decision thresholds on each model's validation cases,
  # through the same pipeline as kdseg segment (hence the original datasets, not the caches); the retina models'
  # are in DRIVE_CHASE, links to the originals. The locally distilled student too, when it is there.
  local orig=${1:?original data root}
  for m in retina_teacher retina_student retina_student_local_hrf; do
    [ -f "$OUT/$m.kdseg.pt" ] || continue
    python3 -m KDSegmentationLib calibrate --model "$OUT/$m.kdseg.pt" --data "$DATA/DRIVE_CHASE" \
      > "$OUT/calibrate_$m.json"
  done
  for m in lung_nodule_teacher lung_nodule_student; do
    python3 -m KDSegmentationLib calibrate --model "$OUT/$m.kdseg.pt" --data "$orig/lung/LIDC-IDRI-slices" \
      > "$OUT/calibrate_$m.json"
  done
}
if [ "$STEP" = all ]; then
  # two lanes, one core each: the 3D liver models, and the 2D models with the ablation and local distillation
  (liver_cv 0 1; liver_student_no_unlabelled 0 1; retina_teacher; retina_student; ablation retina; local_distill
   labels_only retina) &
  (liver_cv 2; liver; liver_student_no_unlabelled 2; lung_nodule_teacher; lung_nodule_student
   ablation lung_nodule; labels_only lung_nodule) &
  wait
  calibrate "$ORIGINAL_DATA"
else
  "$STEP" "${@:4}"
fi
if [ -f "$OUT/failures.txt" ]; then cat "$OUT/failures.txt"; exit 1; fi
echo "finished $STEP: $OUT"
