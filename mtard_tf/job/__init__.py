"""Running the job: the stages of `--mode=all`, the training runs of the student and the teachers, their checkpoints,
distribution, TensorBoard scalars and profiles, and the start of every command."""
