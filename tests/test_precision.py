"""16-bit training, float32 evaluation and export: --precision=auto, and what a mixed-precision student computes in."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from mtard_tf import config as config_lib
from mtard_tf import distribute, models


@pytest.mark.parametrize("native,expected", [(True, "mixed_bfloat16"), (False, "float32")])
def test_auto_precision_is_bfloat16_only_where_the_device_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(distribute, "native_bfloat16", lambda: (native, "test device"))
    assert distribute.resolve_precision("auto") == (expected, "auto: test device")
    for explicit in config_lib.PRECISIONS:
        assert distribute.resolve_precision(explicit) == (explicit, "as requested")


def test_native_bfloat16_names_its_reason():
    native, reason = distribute.native_bfloat16()
    assert isinstance(native, bool) and reason.startswith(("CPU", "GPU"))


@pytest.fixture
def bfloat16_saved_model(tmp_path):
    """A small model built and saved under the mixed_bfloat16 policy, as a 16-bit training run saves its student."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = models.build_model("resnet18:width=2,blocks=1", 10)
        path = str(tmp_path / "student.keras")
        model.save(path)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return keras.models.load_model(path, compile=False)


def test_a_bfloat16_student_is_evaluated_in_float32(bfloat16_saved_model):
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in bfloat16_saved_model.layers}
    as_float32 = models.with_dtype_policy(bfloat16_saved_model)
    assert {layer.dtype_policy.name for layer in as_float32.layers} == {"float32"}
    reference = models.build_model("resnet18:width=2,blocks=1", 10)  # float32 layers, the same weights
    reference.set_weights(bfloat16_saved_model.get_weights())
    images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(as_float32(images).numpy(), reference(images).numpy())
    assert np.abs(bfloat16_saved_model(images).numpy() - reference(images).numpy()).max() > 1e-4  # what it fixes
    assert models.with_dtype_policy(as_float32) is as_float32
    served_in_16_bits = models.with_dtype_policy(as_float32, "mixed_bfloat16")
    assert served_in_16_bits.layers[1].dtype_policy.name == "mixed_bfloat16"


def test_auto_precision_flag_and_export_precision_flag_exist():
    config = config_lib.make(precision="auto", export_precision="mixed_bfloat16")
    assert (config.runtime.precision, config.export.precision) == ("auto", "mixed_bfloat16")
    assert config_lib.Config().export.precision == "float32"


def _built_under(policy, weights):
    """resnet18:width=2,blocks=1 built under the global dtype `policy`, with `weights`."""
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = models.build_model("resnet18:width=2,blocks=1", 10)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.set_weights(weights)
    return model


def test_inference_view_computes_as_the_model_built_in_its_policy_with_the_current_weights():
    keras.utils.set_random_seed(0)
    model = models.build_model("resnet18:width=2,blocks=1", 10)
    images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    view = models.InferenceView(model, "mixed_bfloat16")
    for _ in range(2):  # the view reads the model's variables at each call: it follows their updates
        in_bfloat16 = _built_under("mixed_bfloat16", model.get_weights())
        logits = view(images)
        assert logits.dtype == "float32"  # the classifier keeps its float32 policy
        np.testing.assert_array_equal(logits.numpy(), in_bfloat16(images, training=False).numpy())
        assert np.abs(logits.numpy() - model(images, training=False).numpy()).max() > 1e-4
        model.set_weights([w * 1.5 for w in model.get_weights()])
    np.testing.assert_array_equal(models.InferenceView(model)(images).numpy(), model(images, training=False).numpy())
    # A bfloat16 model viewed in float32 computes as the float32 model.
    as_float32 = models.InferenceView(_built_under("mixed_bfloat16", model.get_weights()), "float32")
    np.testing.assert_array_equal(as_float32(images).numpy(), model(images, training=False).numpy())


def test_attack_precision_computes_attack_and_teachers_in_it_and_updates_the_float32_student():
    from test_distiller import initial_weights, make_distiller, random_batches

    weights = initial_weights()
    plain = make_distiller(tf.distribute.get_strategy(), weights)
    mixed = make_distiller(tf.distribute.get_strategy(), weights, attack_precision="mixed_bfloat16")
    assert len(mixed.trainable_variables) == len(plain.trainable_variables)  # the views add no variables
    assert len(mixed.variables) == len(plain.variables)
    images, labels = next(iter(random_batches()))
    one = tf.constant(1.0)
    for name, run in (("attack objective", lambda d: [d.cross_entropy_objective(labels)(images)]),
                      ("teacher targets", lambda d: d.teacher_targets(images, images, one, one))):
        for a, b in zip(run(mixed), run(plain)):
            assert np.abs(a.numpy() - b.numpy()).max() > 1e-6, f"{name}: not computed in 16 bits"
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0.05, err_msg=name)
    history = mixed.fit(random_batches(), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert {v.dtype for v in mixed.student.variables} == {"float32"}
    assert {layer.compute_dtype for layer in mixed.student.layers} == {"float32"}  # the update's passes
    np.testing.assert_array_equal(mixed.attack_model(images).numpy(),
                                  models.InferenceView(mixed.student, "mixed_bfloat16")(images).numpy())


def test_attack_precision_and_profile_flags():
    assert config_lib.Config().runtime.attack_precision == "same"
    assert (config_lib.Config().runtime.profile_dir, config_lib.Config().runtime.profile_step) == ("", 2)
    assert config_lib.make(attack_precision="mixed_bfloat16").runtime.attack_precision == "mixed_bfloat16"
