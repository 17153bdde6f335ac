"""The training methods: the base trainer every method subclasses, B-MTARD and its balancing rules, the baselines of the
paper's tables, their losses and schedules, and the `--method` registry."""
