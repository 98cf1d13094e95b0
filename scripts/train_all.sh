#!/usr/bin/env bash
# Trains every shipped model (teachers, distilled students) and the runs behind the model cards' cross-validation
# and KD ablation, with the project's own commands. Meant for one CUDA GPU; runs of one phase go in parallel.
#
#   bash scripts/train_all.sh TASKS DATA_ROOT OUT_DIR
#
# TASKS: any of "liver lung_nodule retina" (space separated, quoted). DATA_ROOT holds, for each task, either the
# dataset or its prepared cache ('kdseg prepare'): liver -> RadCT (RadCTTACEomics case folders), lung_nodule -> LIDC
# (LIDC-IDRI-slices), retina -> DRIVE and CHASE (CHASE_DB1; only its images are used, for local distillation).
# MINUTES_SCALE (default 1) scales every time budget (e.g. 0.02 for a smoke test on a CPU); DEVICE (default cuda).
set -euo pipefail
TASKS=${1:?tasks}; DATA=${2:?data root}; OUT=${3:?output folder}
SCALE=${MINUTES_SCALE:-1}; DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-1}
HERE=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$HERE/KDSegmentation${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
m() { python3 -c "print(round($1*$SCALE, 3))"; }
kd() { local log=$1; shift; python3 -m KDSegmentationLib "$@" --device "$DEVICE" --workers "$WORKERS" --progress json \
         > "$OUT/$log.log" 2>&1 || echo "FAILED: $log (see $log.log)" | tee -a "$OUT/failures.txt"; }
TEACHER_MIN=$(m 4); STUDENT_MIN=$(m 3)
KD="--losses kd=1 --alpha 0.5 --temperature 2"
# the no-KD baseline is the shipped student architecture trained on the labels alone
student_args() { python3 -c "import json; from KDSegmentationLib.networks import default_arch_args as d; \
print(json.dumps(d('$1', 'student')[1]))"; }
NOVAL="--val-every 100000000"   # cross-validation folds: the held-out fold never selects a checkpoint

liver() {   # 3-fold cross-validation by case (teacher, KD student, no-KD student per fold), then all nine cases
  local D="$DATA/RadCT" P="--patch 64,96,96 --batch-size 4 --seed 0"
  for k in 0 1 2; do
    kd liver_teacher_fold$k train-teacher --task liver --data "$D" --folds 3 --fold $k $NOVAL $P \
       --max-minutes "$TEACHER_MIN" --output "$OUT/cv/liver_teacher_fold$k.kdseg.pt" &
    kd liver_student_seg_fold$k train-teacher --task liver --data "$D" --folds 3 --fold $k $NOVAL $P \
       --arch student_mobile --arch-args "$(student_args liver)" --max-minutes "$STUDENT_MIN" \
       --output "$OUT/cv/liver_student_seg_fold$k.kdseg.pt" &
  done
  kd liver_teacher train-teacher --task liver --data "$D" --val-fraction 0 $P --max-minutes "$TEACHER_MIN" \
     --output "$OUT/liver_teacher.kdseg.pt" &
  wait
  for k in 0 1 2; do
    kd liver_student_kd_fold$k distill --task liver --data "$D" --folds 3 --fold $k $NOVAL $P $KD \
       --teacher "$OUT/cv/liver_teacher_fold$k.kdseg.pt" --max-minutes "$STUDENT_MIN" \
       --output "$OUT/cv/liver_student_kd_fold$k.kdseg.pt" &
  done
  kd liver_student distill --task liver --data "$D" --val-fraction 0 $P $KD --teacher "$OUT/liver_teacher.kdseg.pt" \
     --max-minutes "$STUDENT_MIN" --output "$OUT/liver_student.kdseg.pt" &
  wait
}

lung_nodule() {   # patient split of LIDC-IDRI (lung.split_patients); soft targets from the readers' agreement
  local D="$DATA/LIDC" P="--batch-size 64 --soft-labels"
  kd lung_nodule_teacher train-teacher --task lung_nodule --data "$D" $P --seed 0 --max-minutes "$TEACHER_MIN" \
     --output "$OUT/lung_nodule_teacher.kdseg.pt" &
  for s in 0 1 2; do
    kd lung_nodule_student_seg_seed$s train-teacher --task lung_nodule --data "$D" $P --seed $s --arch student_mobile \
       --arch-args "$(student_args lung_nodule)" --max-minutes "$STUDENT_MIN" \
       --output "$OUT/ablation_lung_nodule/seg_seed$s.kdseg.pt" &
  done
  wait
  for s in 0 1 2; do
    kd lung_nodule_student_kd_seed$s distill --task lung_nodule --data "$D" $P $KD --seed $s \
       --teacher "$OUT/lung_nodule_teacher.kdseg.pt" --max-minutes "$STUDENT_MIN" \
       --output "$OUT/ablation_lung_nodule/kd_seed$s.kdseg.pt" &
  done
  wait
  cp "$OUT/ablation_lung_nodule/kd_seed0.kdseg.pt" "$OUT/lung_nodule_student.kdseg.pt"
}

retina() {   # DRIVE training images (15% held out for validation); CHASE_DB1 never labelled
  local D="$DATA/DRIVE" P="--patch 256,256 --batch-size 16 --val-fraction 0.15"
  kd retina_teacher train-teacher --task retina --data "$D" $P --seed 0 --max-minutes "$TEACHER_MIN" \
     --output "$OUT/retina_teacher.kdseg.pt" &
  for s in 0 1 2; do
    kd retina_student_seg_seed$s train-teacher --task retina --data "$D" $P --seed $s --arch student_mobile \
       --arch-args "$(student_args retina)" --max-minutes "$STUDENT_MIN" \
       --output "$OUT/ablation_retina/seg_seed$s.kdseg.pt" &
  done
  wait
  for s in 0 1 2; do
    kd retina_student_kd_seed$s distill --task retina --data "$D" $P $KD --seed $s \
       --teacher "$OUT/retina_teacher.kdseg.pt" --max-minutes "$STUDENT_MIN" \
       --output "$OUT/ablation_retina/kd_seed$s.kdseg.pt" &
  done
  wait
  cp "$OUT/ablation_retina/kd_seed0.kdseg.pt" "$OUT/retina_student.kdseg.pt"
  # local distillation: the shipped student adapts to another camera from its unlabelled photographs
  kd retina_student_local_chase distill --task retina --data "$D" $P $KD --seed 0 --unlabeled "$DATA/CHASE" \
     --unlabeled-fraction 0.5 --init "$OUT/retina_student.kdseg.pt" --teacher "$OUT/retina_teacher.kdseg.pt" \
     --max-minutes "$(m 1.5)" --lr 5e-4 --output "$OUT/retina_student_local_chase.kdseg.pt"
}

for t in $TASKS; do "$t" & done
wait
[ -f "$OUT/failures.txt" ] && { cat "$OUT/failures.txt"; exit 1; }
echo "all runs finished: $OUT"
