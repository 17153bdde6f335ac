"""mtard_tf: Balanced Multi-Teacher Adversarial Robustness Distillation (B-MTARD) in Keras 3 / TensorFlow."""
