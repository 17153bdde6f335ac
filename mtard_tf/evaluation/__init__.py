"""Evaluation of trained models: robustness under the paper's attacks, the statistics of finite-sample accuracies, and
the picture of a run's balancing dynamics."""
