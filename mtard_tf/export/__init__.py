"""Export of the student: a TF Serving SavedModel, or a TensorFlow Lite file and the interpreter that evaluates it."""
