#!/usr/bin/env bash
# The small-budget factor study (loss scale, teacher strength, budget): each line is one `mtard_tf.reproduce` call
# whose --model_dir holds one factor's students; re-running the script resumes (reproduce reuses every finished
# teacher, student and evaluation, and an interrupted training continues from its last checkpoint).
#   bash docs/factor_study/run.sh            # from the repository root; STUDY_DIR, DATA_DIR override the defaults
#   bash docs/factor_study/run.sh keep       # copy the finished models and evaluations into docs/factor_study/kept
#   bash docs/factor_study/run.sh strong     # only the teacher-strength rows (a second process may run them)
#   bash docs/factor_study/run.sh others     # every row but the teacher-strength ones (beside `strong`)
#   bash docs/factor_study/run.sh middle     # the 12-epoch WRN-10-2 teacher and its students (a middle point)
# What an earlier sitting finished and kept (docs/factor_study/kept/<row>/, same layout as the study's directories)
# is copied in first, so a sitting on another machine does not train or evaluate it again. An unfinished training's
# checkpoints stay in STUDY_DIR, out of the repository (a training's state is megabytes per checkpoint): a sitting
# with the same STUDY_DIR resumes it, one without it trains it from the start.
set -u
cd "$(dirname "$0")/../.."
STUDY=${STUDY_DIR:-runs/factor_study}
DATA=${DATA_DIR:-../shared/data/tfds}
KEPT=docs/factor_study/kept
COMMON=(--flagfile=flags/cpu_small.cfg --dataset=cifar10 "--data_dir=$DATA" --nodownload --epochs=3 --milestones=2
        --num_eval_examples=1000 --seeds=0 --select=best_holdout --select_every_before=1 --precision=float32
        --attacks=clean,pgd_trades,autoattack)
# The files that make a finished stage reusable (a model, its record, its evaluation, its balancing picture) and
# the comparison; checkpoints and TensorBoard logs stay out.
KEEP=(\( -name '*.keras' -o -name 'student.json' -o -name 'clean.json' -o -name 'robust.json' -o -name report.json
      -o -name report.md -o -name per_image.npz -o -name balance.png -o -name 'comparison.*' -o -name tradeoff.png \)
      ! -path '*/selection/*' ! -name 'student_last.*')

copy_files() {  # source dir, target dir, find filters...: copies the matching files (COPY: cp's options)
  local source=$1 target=$2; shift 2
  [ -d "$source" ] || return 0
  (cd "$source" && find . -type f \( "$@" \) | sort) | while read -r file; do
    mkdir -p "$target/$(dirname "$file")"
    cp "${COPY:--n}" "$source/$file" "$target/$file"
  done
}
restore() {  # kept row dir, study row dir: models first, then what is derived from them (reuse checks mtimes)
  copy_files "$1" "$2" -name '*.keras' -o -name 'student.json' -o -name 'clean.json' -o -name 'robust.json'
  copy_files "$1" "$2" -path '*/eval/*'
  copy_files "$1" "$2" -name balance.png
}
copy_teachers() {  # source model_dir, target model_dir, which teachers: clean, robust or both
  for kind in clean robust; do
    if [ "$3" = both ] || [ "$3" = "$kind" ]; then
      copy_files "$1/teachers" "$2/teachers" -name "$kind.*"
      copy_files "$1/eval" "$2/eval" -path "./${kind}_teacher/*"
    fi
  done
}
step() {
  echo "=== $(date -u +%FT%TZ) start $*"
  python -m mtard_tf.reproduce "${COMMON[@]}" "$@"
  echo "=== $(date -u +%FT%TZ) rc=$? $*"
}

if [ "${1:-}" = keep ]; then  # the study's files are the newest: a comparison rewritten since is copied again
  COPY=-f
  for row in "$STUDY"/*/; do
    copy_files "$row" "$KEPT/$(basename "$row")" "${KEEP[@]}"
  done
  exit 0
fi
for row in "$KEPT"/*/; do
  [ -d "$row" ] && restore "$row" "$STUDY/$(basename "$row")"
done
# Teacher strength: the same clean teacher, a stronger robust teacher, the same students. The preset's teacher trained
# 12 epochs instead of 3 (middle_teacher, strong_teacher/) came out below the mark (SAT's student + 5 AutoAttack
# points), so the rows' teacher is a wider network, ResNet-18 width 16 trained with PGD-AT for 12 epochs
# (wide_teacher/). The 12-epoch teacher's own figures are in the study; its students, a middle point, were left out
# of the CPU budget (`run.sh middle` runs them).
wide_teacher() {
  copy_teachers "$STUDY/baseline" "$STUDY/wide_teacher" clean
  step "--model_dir=$STUDY/wide_teacher" --robust_teacher_arch=resnet18:width=16 --robust_teacher_method=pgd_at \
    --robust_teacher_epochs=12 --methods=b_mtard,rslad
}
middle_teacher() {
  copy_teachers "$STUDY/baseline" "$STUDY/strong_teacher" clean
  step "--model_dir=$STUDY/strong_teacher" --robust_teacher_epochs=12 --methods=b_mtard,rslad
}
if [ "${1:-}" = middle ]; then
  middle_teacher
  exit 0
fi
if [ "${1:-}" = strong ]; then  # the teacher-strength rows alone, e.g. beside the others on a second process
  wide_teacher
  exit 0
fi
# Loss scale: each distillation method at the paper's kl_scale (1) and at 10, a variant (flags/variants/kl10.cfg)
# compared with its own method in the same comparison.
step "--model_dir=$STUDY/baseline" --methods=b_mtard,sat
step "--model_dir=$STUDY/baseline" --methods=b_mtard,b_mtard@kl10,sat
step "--model_dir=$STUDY/baseline" --methods=b_mtard,b_mtard@kl10,sat,rslad,rslad@kl10
step "--model_dir=$STUDY/baseline" --methods=b_mtard,b_mtard@kl10,sat,rslad,rslad@kl10,mtard,mtard@kl10,trades
[ "${1:-}" = others ] || wide_teacher
# Budget: 3x the steps. The distillation methods at the loss scale that won above for both of them, 10
# (flags/variants/kl10_long.cfg, compared with their @kl10 rows), SAT with flags/variants/long.cfg.
step "--model_dir=$STUDY/baseline" \
  "--methods=b_mtard,b_mtard@kl10,sat,rslad,rslad@kl10,mtard,mtard@kl10,trades,b_mtard@kl10_long,sat@long,rslad@kl10_long"
# The re-run of one row: B-MTARD's baseline student trained and evaluated again by the same command, from the same
# teachers (copied), in a directory of its own (rerun/); compared with baseline/students/b_mtard on the same images.
copy_teachers "$STUDY/baseline" "$STUDY/rerun" both
step "--model_dir=$STUDY/rerun" --methods=b_mtard
# A second seed where a difference is within twice its interval's half-width: MTARD against B-MTARD at kl_scale 10
# (the same teachers, copied; its comparison in seed1/).
copy_teachers "$STUDY/baseline" "$STUDY/seed1" both
step "--model_dir=$STUDY/seed1" --seeds=1 --methods=b_mtard@kl10,mtard@kl10
echo "=== done"
