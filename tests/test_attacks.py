"""The training PGD: stays in the eps-ball and [0, 1], and raises the loss of a trained model."""

import keras
import numpy as np
import tensorflow as tf

from mtard_tf.attacks import white_box
from mtard_tf.methods import losses

EPSILON = 8 / 255


def colour_data(n, seed=0):
    """Images whose class (0, 1 or 2) is the brightest colour channel: learnable in seconds."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.uniform(0.2, 0.6, (n, 8, 8, 3)).astype(np.float32)
    images[np.arange(n), :, :, labels] += 0.06
    return np.clip(images, 0, 1), labels.astype(np.int32)


def trained_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(16, "relu"),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    images, labels = colour_data(512)
    model.fit(images, labels, epochs=20, batch_size=64, verbose=0)
    return model


def test_pgd_stays_in_ball_and_raises_loss():
    model = trained_model()
    images, labels = colour_data(128, seed=1)
    clean_accuracy = np.mean(np.argmax(model(images), -1) == labels)
    assert clean_accuracy > 0.9

    def objective(x):
        return losses.cross_entropy(labels, model(x, training=False))

    noise = tf.random.stateless_normal(images.shape, seed=[0, 0])
    adversarial = white_box.pgd(objective, images, white_box.normal_start(images, noise), epsilon=EPSILON,
                                step_size=2 / 255, steps=10).numpy()
    assert np.abs(adversarial - images).max() <= EPSILON + 1e-6
    assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0
    assert objective(adversarial).numpy().mean() > 2 * objective(images).numpy().mean()
    assert np.mean(np.argmax(model(adversarial), -1) == labels) < clean_accuracy


def test_pgd_from_uniform_start_and_fgsm_stay_in_ball():
    model = trained_model()
    images, labels = colour_data(64, seed=2)
    images[:8] = 0.0  # pixels at the box boundary: clipping to [0, 1] must win over the ball
    objective = lambda x: losses.cross_entropy(labels, model(x))  # noqa: E731
    start = white_box.uniform_start(images, tf.random.stateless_uniform(images.shape, [1, 2], -1, 1), EPSILON)
    for adversarial in (white_box.pgd(objective, images, start, epsilon=EPSILON, step_size=0.003, steps=5),
                        white_box.fgsm(objective, images, epsilon=EPSILON)):
        adversarial = adversarial.numpy()
        assert np.abs(adversarial - images).max() <= EPSILON + 1e-6
        assert adversarial.min() >= 0.0 and adversarial.max() <= 1.0


def test_pgd_returns_a_constant():
    images = tf.random.uniform((4, 8, 8, 3))
    with tf.GradientTape() as tape:
        tape.watch(images)
        adversarial = white_box.pgd(lambda x: tf.reduce_sum(x, [1, 2, 3]), images, images, epsilon=EPSILON,
                                    step_size=2 / 255, steps=2)
        total = tf.reduce_sum(adversarial)
    assert tape.gradient(total, images) is None
