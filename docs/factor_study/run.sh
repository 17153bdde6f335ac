#!/usr/bin/env bash
# The small-budget factor study (loss scale, teacher strength, budget): each line is one `mtard_tf.reproduce` call
# whose --model_dir holds one factor's students; re-running the script resumes (reproduce reuses every finished
# teacher, student and evaluation, and an interrupted training continues from its last checkpoint).
#   bash docs/factor_study/run.sh            # from the repository root; STUDY_DIR, DATA_DIR override the defaults
# Teachers trained by an earlier sitting and kept in docs/factor_study/teachers/ are copied in first, so a new
# machine does not train them again.
set -u
cd "$(dirname "$0")/../.."
STUDY=${STUDY_DIR:-runs/factor_study}
DATA=${DATA_DIR:-../shared/data/tfds}
KEPT=docs/factor_study/teachers
COMMON=(--flagfile=flags/cpu_small.cfg --dataset=cifar10 "--data_dir=$DATA" --nodownload --epochs=3 --milestones=2
        --num_eval_examples=1000 --seeds=0 --select=best_holdout --select_every_before=1 --precision=float32
        --attacks=clean,pgd_trades,autoattack)

copy_teachers() {  # source model_dir, target model_dir, which teachers: clean, robust or both
  mkdir -p "$2/teachers" "$2/eval"
  for kind in clean robust; do
    if [ "$3" = both ] || [ "$3" = "$kind" ]; then
      [ -f "$1/teachers/$kind.keras" ] && cp -n "$1/teachers/$kind.keras" "$1/teachers/$kind.json" "$2/teachers/"
      [ -d "$1/eval/${kind}_teacher" ] && cp -rn "$1/eval/${kind}_teacher" "$2/eval/"
    fi
  done
}
step() {
  echo "=== $(date -u +%FT%TZ) start $*"
  python -m mtard_tf.reproduce "${COMMON[@]}" "$@"
  echo "=== $(date -u +%FT%TZ) rc=$? $*"
}

[ -d "$KEPT/baseline" ] && copy_teachers "$KEPT/baseline" "$STUDY/baseline" both
step "--model_dir=$STUDY/baseline" --methods=b_mtard,sat
copy_teachers "$STUDY/baseline" "$STUDY/kl10" both
step "--model_dir=$STUDY/kl10" --kl_scale=10 --methods=b_mtard
step "--model_dir=$STUDY/baseline" --methods=b_mtard,sat,rslad
step "--model_dir=$STUDY/kl10" --kl_scale=10 --methods=b_mtard,rslad
step "--model_dir=$STUDY/baseline" --methods=b_mtard,sat,rslad,mtard,trades
step "--model_dir=$STUDY/kl10" --kl_scale=10 --methods=b_mtard,rslad,mtard
copy_teachers "$STUDY/baseline" "$STUDY/strong_teacher" clean
[ -d "$KEPT/strong_teacher" ] && copy_teachers "$KEPT/strong_teacher" "$STUDY/strong_teacher" robust
step "--model_dir=$STUDY/strong_teacher" --robust_teacher_epochs=12 --methods=b_mtard,rslad
echo "=== done"
