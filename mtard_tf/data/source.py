"""What `--dataset` names: a tensorflow-datasets dataset (its name), or a folder of labelled images
(`folder:PATH`, an ImageFolderSource) together with the settings that make the folder one fixed dataset.

No TensorFlow here: the configuration builds a source before TensorFlow starts.
"""

import dataclasses
import os

FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class ImageFolderSource:
    """A folder `PATH/train/<class>/<image>` (and `PATH/test/...` or `PATH/val/...`) read as an image-classification
    dataset (mtard_tf.data.image_folder prepares it into tfds' format).

    Args:
      path: the folder.
      image_size: (height, width) every image is resized to; () keeps the images' own size, which must then be the
        same for all.
      test_fraction: without a test/ or val/ folder, the fraction of each class's train images held out as the
        test split (chosen with a fixed seed, so every run on the folder has the same test images).
    """
    path: str
    image_size: tuple
    test_fraction: float

    def __str__(self):
        return FOLDER_PREFIX + self.path


def is_folder(dataset):
    """True for a `folder:PATH` dataset name."""
    return str(dataset).startswith(FOLDER_PREFIX)


def dataset_source(dataset, image_size, test_fraction):
    """The source of `--dataset`: an ImageFolderSource (absolute path) for `folder:PATH`, else the tfds name itself.
    `image_size` and `test_fraction` apply to folders only (the configuration refuses them for tfds names)."""
    if not is_folder(dataset):
        return dataset
    return ImageFolderSource(os.path.abspath(os.path.expanduser(dataset[len(FOLDER_PREFIX):])), tuple(image_size),
                             float(test_fraction))
