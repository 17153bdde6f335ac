"""Image-classification data from tensorflow-datasets (the train, evaluation and held-out streams) and the datasets this
project registers with tfds (Tiny-ImageNet)."""
