"""mtard_tf: Balanced Multi-Teacher Adversarial Robustness Distillation (B-MTARD) in Keras 3 / TensorFlow.

The package is a command (`python -m mtard_tf.main`) and a Keras library. The library's names, listed in `__all__`,
are what a Keras user composes: the distiller and every baseline trainer (keras.Model subclasses: `compile`, `fit`),
the attacks as functions of a model and a batch, the robustness evaluation, the exports, the model registry and the
PyTorch importer. Each is defined in its layer's module and re-exported here.

Every name is imported on first use (PEP 562 `__getattr__`), so `import mtard_tf` imports neither TensorFlow nor
PyTorch: the commands define their flags and start TensorFlow quietly before anything else, and PyTorch, an optional
dependency, is read only by the importer's checkpoint reader.

Example:

    import mtard_tf
    distiller = mtard_tf.Distiller(student, clean_teacher, robust_teacher)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    distiller.fit(dataset, epochs=1)
    report = mtard_tf.evaluate(distiller.student, test_dataset, attacks=["pgd_sat"], output_dir="eval")
"""

import importlib

# name -> the module that defines it (and the attribute's name there when it differs).
_API = {
    # Training: the B-MTARD / MTARD distiller, the baselines and their base class, the method registry.
    "Distiller": ("mtard_tf.methods.b_mtard", "Distiller"),
    "Trainer": ("mtard_tf.methods.trainer", "Trainer"),
    "NaturalTrainer": ("mtard_tf.methods.baselines", "NaturalTrainer"),
    "AdversarialTrainer": ("mtard_tf.methods.baselines", "AdversarialTrainer"),
    "ARDTrainer": ("mtard_tf.methods.baselines", "ARDTrainer"),
    "RSLADTrainer": ("mtard_tf.methods.baselines", "RSLADTrainer"),
    "AdaADTrainer": ("mtard_tf.methods.baselines", "AdaADTrainer"),
    "Method": ("mtard_tf.methods.registry", "Method"),
    "get_method": ("mtard_tf.methods.registry", "get_method"),
    "ScalarSummaries": ("mtard_tf.job.summaries", "ScalarSummaries"),
    # Attacks: functions of (model, images, labels) returning adversarial images.
    "fgsm": ("mtard_tf.evaluation.robustness", "fgsm"),
    "pgd": ("mtard_tf.evaluation.robustness", "pgd"),
    "pgd_trades": ("mtard_tf.evaluation.robustness", "pgd_trades"),
    "cw": ("mtard_tf.evaluation.robustness", "cw"),
    "autoattack": ("mtard_tf.attacks.autoattack", "autoattack_standard"),
    # Evaluation.
    "evaluate": ("mtard_tf.evaluation.robustness", "evaluate"),
    "read_per_image": ("mtard_tf.evaluation.robustness", "read_per_image"),
    "wilson_interval": ("mtard_tf.evaluation.stats", "wilson_interval"),
    "mcnemar_exact": ("mtard_tf.evaluation.stats", "mcnemar_exact"),
    # Export.
    "export_saved_model": ("mtard_tf.export.saved_model", "export_model"),
    "export_tflite": ("mtard_tf.export.tflite", "export_tflite"),
    "TFLiteModel": ("mtard_tf.export.tflite", "TFLiteModel"),
    # Models: the registry, model files, logits.
    "build_model": ("mtard_tf.models.architectures", "build_model"),
    "available_models": ("mtard_tf.models.architectures", "available_models"),
    "load_model": ("mtard_tf.models.loading", "load_model"),
    "check_logits": ("mtard_tf.models.loading", "check_logits"),
    "strip_softmax": ("mtard_tf.models.loading", "strip_softmax"),
    # PyTorch checkpoints (reading a checkpoint file needs torch, requirements-torch.txt).
    "convert_checkpoint": ("mtard_tf.pytorch.importer", "convert_checkpoint"),
    "convert_state_dict": ("mtard_tf.pytorch.importer", "convert_state_dict"),
}

__all__ = list(_API)


def __getattr__(name):
    """The API name `name`, imported from its module on first use (and cached in the package's namespace)."""
    if name not in _API:
        raise AttributeError(f"module 'mtard_tf' has no attribute {name!r}")
    module, attribute = _API[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
