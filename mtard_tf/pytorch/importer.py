"""Import a published PyTorch checkpoint (state dict) into the Keras model of the same architecture.

    python -m mtard_tf.pytorch.importer --arch=wrn34_10 --checkpoint=model_cifar_wrn.pt --num_classes=10 \\
        --out=teacher.keras

`--arch` is a model spec of `mtard_tf.models.architectures` (`wrn34_10`, `resnet56`, `resnet18`, `mobilenetv2`,
`dm_wrn`, with kwargs if the checkpoint is not the default size, e.g. `resnet56:normalize=cifar10` for a checkpoint
trained on normalised inputs, `dm_wrn:normalize=cifar100` for DeepMind's CIFAR-100 WRN-70-16). The checkpoint may be a
plain state dict, one nested under "state_dict" / "model" / "model_state_dict" / "net"; its keys may carry
DataParallel's "module." prefix, and all of them a "model." prefix (RobustBench's loader, robustbench/utils.py
load_model, removes both).

Every tensor is mapped onto the Keras layer named after its PyTorch module path (`torch_path` inverts the naming):
conv kernels OIHW -> HWIO (depthwise [C, 1, kh, kw] -> [kh, kw, C, 1]), linear weights transposed, BatchNorm
weight / bias / running_mean / running_var -> gamma / beta / moving_mean / moving_variance (BatchNorm eps is not
stored in a state dict: the Keras models use PyTorch's 1e-5). BatchNorm's `num_batches_tracked` and the TRADES
WideResNet's unused `sub_block1` are ignored. Input normalisation stored in the state dict as a (mean, std) pair
(`mu`/`sigma`, `mean`/`std`, `normalize.mean`/`normalize.std`, ...) becomes the model's `normalize` layer; a
`normalize` given in --arch must agree with it. Without such tensors the spec's `normalize` applies: DeepMind's and
RobustBench's `dm_wrn` checkpoints hold none (their mean / std are not part of the state dict), so a CIFAR-100 one
needs `dm_wrn:normalize=cifar100`.
Anything else that does not fit (missing, unexpected or mis-shaped tensors) is refused with one line that lists
them.

torch is an optional dependency (requirements-torch.txt) and is imported only to read a checkpoint file;
`convert_state_dict` also takes numpy arrays.
"""

import sys

import numpy as np

from mtard_tf.errors import UserError
from mtard_tf.models import architectures

NESTED_KEYS = ("state_dict", "model", "model_state_dict", "net")
IGNORED_SUFFIXES = (".num_batches_tracked",)
# Tensors of the reference modules that the forward pass never uses.
IGNORED_PREFIXES = {
    "wrn34_10": ("sub_block1.",),
    "wide_resnet": ("sub_block1.",),
}
NORMALIZATION_KEYS = (
    ("mu", "sigma"),
    ("mean", "std"),
    ("normalize.mean", "normalize.std"),
    ("norm.mean", "norm.std"),
    ("normalization.mean", "normalization.std"),
)
_LISTED = 8  # names listed per category in an error message


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the architecture; the message is one line."""


def _to_numpy(value):
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def unwrap_state_dict(checkpoint):
    """A checkpoint object -> flat {name: numpy array}: un-nests it and drops DataParallel's "module." prefix, and a
    "model." prefix that every key carries (a wrapping module)."""
    obj = checkpoint
    for _ in range(4):
        if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, dict):
            obj = obj.state_dict()  # a whole pickled nn.Module
        if not isinstance(obj, dict) and not hasattr(obj, "items"):
            break
        nested = [k for k in NESTED_KEYS if k in obj and hasattr(obj[k], "items")]
        if not nested:
            break
        obj = obj[nested[0]]
    if not hasattr(obj, "items"):
        raise CheckpointError(f"the checkpoint holds a {type(checkpoint).__name__}, not a state dict")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"the checkpoint has a non-string key {key!r}; it is not a state dict")
        if not (hasattr(value, "detach") or isinstance(value, (np.ndarray, np.generic, float, int))):
            nested_hint = f" (nested dicts: {', '.join(k for k in obj if hasattr(obj[k], 'items'))})" if any(
                hasattr(v, "items") for v in obj.values()) else ""
            raise CheckpointError(
                f"the checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; it is not a state dict"
                + nested_hint)
        name = key
        while name.startswith("module."):
            name = name[len("module."):]
        if name in state:
            raise CheckpointError(f"the checkpoint has {name!r} twice (with and without the 'module.' prefix)")
        state[name] = _to_numpy(value)
    if not state:
        raise CheckpointError("the checkpoint's state dict is empty")
    if all(name.startswith("model.") for name in state):
        state = {name[len("model."):]: value for name, value in state.items()}
    return state


def load_checkpoint(path, trust_checkpoint=False):
    """Reads a PyTorch checkpoint file (torch is imported here, lazily) -> flat {name: numpy array}.

    Unless `trust_checkpoint`, the file is read with `weights_only=True` (no arbitrary pickled objects).
    """
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise CheckpointError(
            f"reading a PyTorch checkpoint needs torch ({error}); pip install -r requirements-torch.txt") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except FileNotFoundError:
        raise CheckpointError(f"no such checkpoint file: {path}") from None
    except Exception as error:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        detail = " ".join(str(error).split())[:300]
        hint = "" if trust_checkpoint else " (if it is a trusted file with pickled objects, pass --trust_checkpoint)"
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {type(error).__name__}: {detail}{hint}") \
            from None
    return unwrap_state_dict(checkpoint)


def torch_path(keras_layer_name):
    """The PyTorch module path of a Keras layer: the inverse of architectures._Builder.name ("__" -> "_", then
    "_" -> "."), e.g. layer_0_block_0_batchnorm__0 -> layer.0.block.0.batchnorm_0."""
    return "_".join(part.replace("_", ".") for part in keras_layer_name.split("__"))


def _expected_tensors(layer):
    """[(torch param name, keras weight variable, converter from the torch array)] for a layer with weights."""
    import keras  # pylint: disable=import-outside-toplevel

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        pairs = [("weight", layer.kernel, lambda w: np.transpose(w, (2, 3, 0, 1)))]
        if layer.use_bias:
            pairs.append(("bias", layer.bias, None))
        return pairs
    if isinstance(layer, keras.layers.Conv2D):
        pairs = [("weight", layer.kernel, lambda w: np.transpose(w, (2, 3, 1, 0)))]
        if layer.use_bias:
            pairs.append(("bias", layer.bias, None))
        return pairs
    if isinstance(layer, keras.layers.Dense):
        pairs = [("weight", layer.kernel, np.transpose)]
        if layer.use_bias:
            pairs.append(("bias", layer.bias, None))
        return pairs
    if isinstance(layer, keras.layers.BatchNormalization):
        pairs = []
        if layer.scale:
            pairs.append(("weight", layer.gamma, None))
        if layer.center:
            pairs.append(("bias", layer.beta, None))
        return pairs + [("running_mean", layer.moving_mean, None), ("running_var", layer.moving_variance, None)]
    if layer.weights:
        raise CheckpointError(f"no PyTorch mapping for Keras layer {layer.name} ({type(layer).__name__})")
    return []


def _listing(kind, names):
    if not names:
        return None
    shown = ", ".join(names[:_LISTED])
    more = f" (+{len(names) - _LISTED} more)" if len(names) > _LISTED else ""
    return f"{kind} {len(names)}: {shown}{more}"


def _split_normalization(state, arch_spec):
    """Pops a (mean, std) pair out of the state dict and returns the spec that carries it."""
    name, kwargs = architectures.parse_model_spec(arch_spec)
    found = [(m, s) for m, s in NORMALIZATION_KEYS if m in state and s in state]
    if not found:
        return arch_spec
    mean_key, std_key = found[0]
    mean = np.asarray(state.pop(mean_key), np.float64).reshape(-1)
    std = np.asarray(state.pop(std_key), np.float64).reshape(-1)
    if mean.shape != std.shape or mean.size not in (1, 3):
        raise CheckpointError(
            f"the checkpoint's input normalisation {mean_key}/{std_key} has shapes {mean.shape}/{std.shape}, "
            "expected 3 channels")
    mean, std = np.broadcast_to(mean, (3,)), np.broadcast_to(std, (3,))
    if "normalize" in kwargs:
        spec_stats = architectures.model_arguments(arch_spec)[1]["normalize"]
        if spec_stats is not None and not (np.allclose(spec_stats[0], mean, atol=1e-6)
                                           and np.allclose(spec_stats[1], std, atol=1e-6)):
            raise CheckpointError(
                f"the checkpoint's input normalisation (mean {mean.tolist()}, std {std.tolist()}) differs from "
                f"normalize={kwargs['normalize']} in --arch")
    kwargs["normalize"] = "/".join(repr(float(v)) for v in (*mean, *std))
    return name + ":" + ",".join(f"{k}={v}" for k, v in kwargs.items())


def convert_state_dict(arch_spec, state_dict, num_classes, input_shape=(32, 32, 3)):
    """Builds `arch_spec` and loads a PyTorch state dict (torch tensors or numpy arrays) into it.

    Raises CheckpointError (one line) listing missing / unexpected / mis-shaped tensors if it does not fit.

    Args:
      arch_spec: a model spec of the registry (build_model), e.g. "wrn34_10" or "resnet56:normalize=cifar10".
      state_dict: the checkpoint's tensors by PyTorch name (torch tensors or numpy arrays, possibly nested).
      num_classes: the number of logits. input_shape: (H, W, C) of the images.

    Returns:
      The Keras model holding the checkpoint's weights.

    Example:

    >>> teacher = mtard_tf.convert_state_dict("resnet56", torch.load("resnet56.pt"), num_classes=10)
    """
    state = unwrap_state_dict(state_dict)
    name, _ = architectures.parse_model_spec(arch_spec)
    spec = _split_normalization(state, arch_spec)
    model = architectures.build_model(spec, num_classes, input_shape=input_shape)

    ignored = IGNORED_PREFIXES.get(name, ())
    remaining = {k: v for k, v in state.items()
                 if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(ignored)}
    missing, misshaped, assignments = [], [], []
    for layer in model.layers:
        prefix = torch_path(layer.name)
        for param, variable, convert in _expected_tensors(layer):
            key = f"{prefix}.{param}"
            if key not in remaining:
                missing.append(key)
                continue
            array = remaining.pop(key)
            if array.dtype.kind not in "fiu":
                misshaped.append(f"{key} (dtype {array.dtype})")
                continue
            value = convert(array) if convert is not None and array.ndim == len(variable.shape) else array
            if tuple(value.shape) != tuple(variable.shape):
                expected_torch = _torch_shape(param, layer, tuple(variable.shape))
                misshaped.append(f"{key} (checkpoint {tuple(array.shape)}, {name} needs {expected_torch})")
                continue
            assignments.append((variable, value.astype(np.float32)))
    unexpected = sorted(remaining)
    problems = [p for p in (_listing("missing", missing), _listing("unexpected", unexpected),
                            _listing("mis-shaped", misshaped)) if p]
    if problems:
        raise CheckpointError(
            f"the checkpoint does not fit --arch={arch_spec} with num_classes={num_classes}: " + "; ".join(problems))
    for variable, value in assignments:
        variable.assign(value)
    return model


def _torch_shape(param, layer, keras_shape):
    """The PyTorch shape that corresponds to a Keras weight shape, for error messages."""
    import keras  # pylint: disable=import-outside-toplevel

    if param == "weight" and len(keras_shape) == 4:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, channels, multiplier = keras_shape
            return (channels * multiplier, 1, kh, kw)
        kh, kw, cin, cout = keras_shape
        return (cout, cin, kh, kw)
    if param == "weight" and len(keras_shape) == 2:
        return keras_shape[::-1]
    return keras_shape


def convert_checkpoint(arch_spec, checkpoint_path, num_classes, out_path=None, trust_checkpoint=False,
                       input_shape=(32, 32, 3)):
    """Reads a checkpoint file, converts it, and saves the Keras model to `out_path` (a .keras file) if given.

    Reading the file needs torch (requirements-torch.txt). `trust_checkpoint` allows a pickle that is not a plain
    state dict (it runs the file's code: only for files of a trusted source).

    Args:
      arch_spec: the registry's model spec of the checkpoint's architecture (convert_state_dict).
      checkpoint_path: the PyTorch checkpoint file. num_classes: the number of logits.
      out_path: a .keras file to save the model to, or None.

    Returns:
      The Keras model.

    Example:

    >>> teacher = mtard_tf.convert_checkpoint("wrn34_10", "model_cifar_wrn.pt", 10, out_path="robust.keras")
    """
    state = load_checkpoint(checkpoint_path, trust_checkpoint=trust_checkpoint)
    model = convert_state_dict(arch_spec, state, num_classes, input_shape=input_shape)
    if out_path:
        model.save(out_path)
    return model


def describe_normalization(model):
    """The input normalisation a converted model applies, for the command line's report (a preset is easy to miss)."""
    layer = next((layer for layer in model.layers if layer.name == "normalize"), None)
    if layer is None:
        return "inputs not normalised"
    config = layer.get_config()
    mean = ", ".join(f"{float(m):.4f}" for m in config["mean"])
    std = ", ".join(f"{float(v) ** 0.5:.4f}" for v in config["variance"])
    return f"inputs normalised by mean ({mean}), std ({std})"


def define_flags(flag_values=None):
    """The command's flags (called by run())."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    flag_values = flags.FLAGS if flag_values is None else flag_values
    if "arch" in flag_values:
        return
    flags.DEFINE_string("arch", None, "Model spec of mtard_tf.models.architectures: wrn34_10, resnet56, resnet18, "
                        "mobilenetv2, dm_wrn (with :key=value kwargs for non-default sizes or normalize=cifar10).",
                        flag_values=flag_values)
    flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint file (.pt / .pth) holding a state dict.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_classes", 10, "Number of classes of the checkpoint's classifier.",
                         flag_values=flag_values)
    flags.DEFINE_string("out", None, "Where to write the Keras model (.keras).", flag_values=flag_values)
    flags.DEFINE_bool("trust_checkpoint", False,
                      "Read the checkpoint with torch.load(weights_only=False): only for trusted files that pickle "
                      "more than tensors.", flag_values=flag_values)
    flags.mark_flags_as_required(["arch", "checkpoint", "out"], flag_values=flag_values)


def main(argv):
    from absl import flags  # pylint: disable=import-outside-toplevel

    del argv  # startup.run_app refuses positional arguments
    FLAGS = flags.FLAGS
    if not FLAGS.out.endswith(".keras"):
        print(f"import_torch: error: --out must end with .keras, got {FLAGS.out}", file=sys.stderr)
        return 1
    try:
        model = convert_checkpoint(FLAGS.arch, FLAGS.checkpoint, FLAGS.num_classes, FLAGS.out,
                                   trust_checkpoint=FLAGS.trust_checkpoint)
    except UserError as error:
        print(f"import_torch: error: {error}", file=sys.stderr)
        return 1
    print(f"import_torch: wrote {FLAGS.out} ({model.name}, {model.count_params():,} weights, "
          f"{describe_normalization(model)}) from {FLAGS.checkpoint}")
    return 0


def run():
    from mtard_tf.job import startup  # pylint: disable=import-outside-toplevel

    define_flags()
    startup.run_app(main)


if __name__ == "__main__":
    run()
