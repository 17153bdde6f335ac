"""Adds ArrayRecord files beside a prepared dataset's tfrecord files, so that the train split can be read from disk by
index (--train_source=disk): python -m mtard_tf.tools.add_array_record --dataset=NAME [--data_dir=DIR] (and, for
--dataset=folder:PATH, the --image_size and --folder_test_fraction it was prepared with).

tfds' own tool for this, `tfds convert_format`, needs apache-beam, which tensorflow-datasets does not install
(tensorflow/datasets#5463) and whose install (2.77) downgrades protobuf from the 7.x TensorFlow runs with to 6.x; this
one needs nothing beyond requirements.txt. It writes
into the dataset's directory (next to the tfrecord files, which tf.data keeps reading) and records the format in
its dataset_info.json; a second run finds the files and does nothing.
"""


from absl import flags, logging

from mtard_tf import config
from mtard_tf.job import startup

FLAGS = flags.FLAGS


DATA_FLAGS = ("dataset", "data_dir", "image_size", "folder_test_fraction")


def define_flags(flag_values=FLAGS):
    """The configuration's data flags (config.define_flags; called by run())."""
    config.define_flags(flag_values, names=DATA_FLAGS)


def main(argv):
    del argv  # startup.run_app refuses positional arguments
    verbose = FLAGS["verbosity"].present
    if not verbose:
        logging.set_verbosity(logging.WARNING)
    startup.start_tensorflow(verbose)
    from mtard_tf.data import datasets
    data = config.from_flags(FLAGS, names=DATA_FLAGS).data  # a UserError is one line (startup.run_app)
    written = datasets.add_array_record(data.source, data.data_dir)
    if written:
        print(f"dataset '{FLAGS.dataset}': wrote {written} examples as ArrayRecord beside its tfrecord files")
    else:
        print(f"dataset '{FLAGS.dataset}': its ArrayRecord files are there already")
    return 0


def run():
    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
