"""Image-classification data from tensorflow-datasets (the train, evaluation and held-out streams), the datasets this
project registers with tfds (Tiny-ImageNet), and folders of the user's own labelled images (folder:PATH)."""
