"""16-bit training, float32 evaluation and export: --precision=auto, and what a mixed-precision student computes in."""

import keras
import numpy as np
import pytest

from mtard_tf import config as config_lib
from mtard_tf.job import distribute
from mtard_tf.models import architectures


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
        model = architectures.build_model("resnet18:width=2,blocks=1", 10)
        path = str(tmp_path / "student.keras")
        model.save(path)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return keras.models.load_model(path, compile=False)


def test_a_bfloat16_student_is_evaluated_in_float32(bfloat16_saved_model):
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in bfloat16_saved_model.layers}
    as_float32 = architectures.with_dtype_policy(bfloat16_saved_model)
    assert {layer.dtype_policy.name for layer in as_float32.layers} == {"float32"}
    reference = architectures.build_model("resnet18:width=2,blocks=1", 10)  # float32 layers, the same weights
    reference.set_weights(bfloat16_saved_model.get_weights())
    images = np.random.default_rng(0).uniform(0, 1, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(as_float32(images).numpy(), reference(images).numpy())
    assert np.abs(bfloat16_saved_model(images).numpy() - reference(images).numpy()).max() > 1e-4  # what it fixes
    assert architectures.with_dtype_policy(as_float32) is as_float32
    served_in_16_bits = architectures.with_dtype_policy(as_float32, "mixed_bfloat16")
    assert served_in_16_bits.layers[1].dtype_policy.name == "mixed_bfloat16"


def test_auto_precision_flag_and_export_precision_flag_exist():
    config = config_lib.make(precision="auto", export_precision="mixed_bfloat16")
    assert (config.runtime.precision, config.export.precision) == ("auto", "mixed_bfloat16")
    assert config_lib.Config().export.precision == "float32"


def test_profile_flags():
    assert (config_lib.Config().runtime.profile_dir, config_lib.Config().runtime.profile_step) == ("", 2)
