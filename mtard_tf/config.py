"""The configuration of a run: typed, nested dataclasses, every default written once, and the absl flags derived
from them.

Each field of a group below is one command-line flag (`flag_name`: the group's prefix + the field's name, unless the
field names its flag). `define_flags` defines them all; `from_flags` reads a parsed flag set back into a `Config`;
`read_flagfile` turns a preset or recipe file (`--name=value` lines) into the same values. Nothing here imports
TensorFlow, so the flags of every entry point are defined before TensorFlow starts.

Why dataclasses and flags rather than a big_vision-style config file: the project's presets are absl flagfiles, which
any flag can override on the command line; deriving the flags from typed dataclasses keeps one definition of each
option while the library code receives plain, immutable, typed objects (`config.attack.epsilon`).

Defaults are the paper's CIFAR-10 setting (zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py).
"""

import dataclasses
import json
import typing

from absl import flags

from mtard_tf.data import source as source_lib
from mtard_tf.errors import UserError


class ConfigError(UserError):
    """A configuration a run cannot use (a value out of range, contradicting options)."""


# Method names in the order of the paper's tables (methods/registry.py's METHODS builds one trainer for each; a test
# checks they agree). Spelled out here because the flags are defined before TensorFlow is imported.
METHOD_NAMES = ("natural", "sat", "trades", "ard", "rslad", "adaad", "mtard", "b_mtard")
TEACHER_METHODS = ("natural", "trades", "pgd_at")
STRATEGIES = ("mirrored", "multi_worker")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
# The attacks of the evaluation (evaluation/robustness.py), in the order of its reports.
ATTACK_NAMES = ("clean", "fgsm", "pgd_sat", "pgd_trades", "cw", "autoattack")
SELECT_MODES = ("last", "best_test", "best_holdout")
EXPORT_FORMATS = ("savedmodel", "tflite")
QUANTIZATIONS = ("none", "float16", "int8")  # the numeric formats of a TFLite export (mtard_tf.export.tflite.convert)
# Where the train stream reads the split (mtard_tf.data.datasets.train_source).
TRAIN_SOURCES = ("auto", "memory", "disk")


def option(default, help, *, flag=None, choices=None, lower=None, upper=None, check=None, factory=None):
    """A configuration field and its flag. flag: the flag's name when it is not the group prefix + field name
    (False: no flag); choices: an enum flag; lower/upper: bounds; check: (predicate, message) on the value."""
    metadata = {"help": help, "flag": flag, "choices": choices, "lower": lower, "upper": upper, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _epochs_check():
    return (lambda v: all(m >= 0 for m in v), "must be a comma-separated list of epoch numbers")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    dataset: str = option("cifar10", "tensorflow-datasets image classification dataset name, or folder:PATH for "
                          "your own images in PATH/train/<class>/ and PATH/test/<class>/ (or PATH/val/<class>/), "
                          "prepared once into --data_dir in tfds' format (docs/datasets.md).")
    data_dir: str | None = option(None, "tensorflow-datasets data directory (default: tfds' own, "
                                        "~/tensorflow_datasets).")
    download: bool = option(True, "Download and prepare the dataset into --data_dir on first use; --nodownload "
                                  "fails at once when it is not there (offline use). A dataset built from files "
                                  "downloaded by hand (--manual_dir) is built either way.")
    manual_dir: str | None = option(None, "Files of a dataset that tfds cannot download itself, from which it is "
                                          "built into --data_dir on first use: for tiny_imagenet the unzipped "
                                          "tiny-imagenet-200/ folder, or the folder holding it (default: tfds' "
                                          "<data_dir>/downloads/manual/).")
    train_source: str = option("auto", "Where the training stream reads the train split: memory (held as uint8 "
                               "tensors), disk (each example read by index from the dataset's ArrayRecord files, which "
                               "python -m mtard_tf.tools.add_array_record adds), auto: memory when the split takes at "
                               "most --in_memory_limit_gb as uint8, else disk. Both give identical batches.",
                               choices=TRAIN_SOURCES)
    in_memory_limit_gb: float = option(4.0, "With --train_source=auto: the largest train split (GB of uint8 pixels) "
                                       "held in memory.", lower=0.0)
    image_size: tuple[int, ...] = option((), "With --dataset=folder:PATH: H,W, the size every image is resized to "
                                         "(bilinear with antialiasing, aspect ratio not kept); required when the "
                                         "images differ in size. Default: the images' own size.",
                                         check=(lambda v: len(v) in (0, 2) and all(s > 0 for s in v),
                                                "must be HEIGHT,WIDTH in pixels, e.g. 32,32"))
    folder_test_fraction: float = option(0.1, "With --dataset=folder:PATH and no test/ or val/ folder: the fraction "
                                         "of each class's train images held out as the test split (the same images "
                                         "for every run on the folder: chosen with seed 0, not --seed).",
                                         check=(lambda v: 0 < v < 1, "must be in (0, 1)"))

    def __post_init__(self):
        if not source_lib.is_folder(self.dataset):
            if self.image_size:
                raise ConfigError("--image_size applies to --dataset=folder:PATH (a tensorflow-datasets dataset has "
                                  "its own image size)")
        elif not self.dataset[len(source_lib.FOLDER_PREFIX):].strip():
            raise ConfigError("--dataset=folder:PATH needs the folder's path after 'folder:'")

    @property
    def source(self):
        """What the data functions read: the tfds name, or the ImageFolderSource of folder:PATH."""
        return source_lib.dataset_source(self.dataset, self.image_size, self.folder_test_fraction)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    model_dir: str = option("runs/cifar10", "Where checkpoints, TensorBoard logs and models are written.")
    seed: int = option(0, "Random seed (initialisation, data order, augmentation, attack noise).", lower=0)
    cpu_replicas: int = option(1, "Split the CPU into N logical devices (multi-replica development).", lower=1)
    strategy: str = option("mirrored", "mirrored: MirroredStrategy over this machine's GPUs (else its CPU); "
                           "multi_worker: MultiWorkerMirroredStrategy over the workers in the TF_CONFIG environment "
                           "variable (start the same command on every worker; --model_dir on storage all of them "
                           "see).", choices=STRATEGIES)
    precision: str = option("float32", "Keras dtype policy of the models trained here: mixed_* computes in 16 "
                            "bits; logits, losses, softmax, entropy and the balancing state stay float32. auto: "
                            "mixed_bfloat16 where the device computes bfloat16 natively (x86 CPUs with AVX512-BF16 or "
                            "AMX, NVIDIA GPUs of compute capability 8.0 or newer), else float32 (not the default: "
                            "bfloat16 gave no accuracy difference but was slower than float32 on an AVX512-BF16 CPU, "
                            "docs/performance.md). Evaluation and export compute in float32 whatever the training "
                            "precision (see --export_precision).", choices=("auto", *PRECISIONS))
    jit_compile: str = option("auto", "XLA for the train step; auto: on for a single GPU, off on CPU (slower "
                              "there) and with several replicas (unsupported).", choices=("auto", "true", "false"))
    sync_batchnorm: bool = option(False, "Synchronise BatchNorm statistics across replicas.")
    deterministic: bool = option(False, "Bit-identical weights from two runs of the same command on the same machine "
                                 "(TensorFlow's op determinism: deterministic kernels, tf.data in order; and one "
                                 "CPU thread per op, one op at a time); an op without a deterministic kernel is an "
                                 "error. Slower.")
    log_every_n_steps: int = option(1, "TensorBoard scalars every N training steps.", lower=1)
    checkpoint_every_n_steps: int = option(0, "Also checkpoint every N training steps (0: at epoch ends only).",
                                           lower=0)
    profile_dir: str = option("", "If set, a TensorFlow profiler trace of training step --profile_step of each "
                              "training this process runs (the student: <profile_dir>/student; a teacher: "
                              "<profile_dir>/teachers/<kind>), for `tensorboard --logdir=<profile_dir>` (Profile tab, "
                              "package tensorboard-plugin-profile).")
    profile_step: int = option(2, "The training step (1-based, counted from this process's start of the training) "
                               "that --profile_dir traces; the first also traces and compiles the step function.",
                               lower=1)
    verbose: int = option(1, "Progress bars (1) or none (0).", flag=False)

    def __post_init__(self):
        if self.strategy != "mirrored" and self.cpu_replicas != 1:
            raise ConfigError("--cpu_replicas applies to --strategy=mirrored only (a multi-worker run has one CPU "
                              "replica per worker)")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """The training attack (PGD, MTARD mtard/mtard_loss.py) and the end-of-epoch validation's PGD-20."""
    epsilon: float = option(8 / 255, "L-inf radius of the attack, in [0, 1] pixel units.",
                            check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    steps: int = option(10, "PGD steps of the training attack.", flag="attack_steps", lower=1)
    step_size: float = option(2 / 255, "PGD step size of the training attack.", flag="attack_step_size",
                              check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    eval_steps: int = option(20, "PGD steps of the end-of-epoch validation attack.", flag="eval_attack_steps",
                             lower=1)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The student's optimizer and schedule (SGD; lr, weight_rate and temperature_rate x decay at milestones)."""
    epochs: int = option(300, "Training epochs.", lower=1)
    steps_per_epoch: int | None = option(None, "Steps per epoch (default: train examples // batch size).", lower=1)
    batch_size: int = option(128, "Global batch size (split over the replicas).", lower=1)
    validation_steps: int | None = option(None, "Test batches per end-of-epoch validation (default: all).", lower=1)
    learning_rate: float = option(0.1, "SGD learning rate.", lower=0.0)
    momentum: float = option(0.9, "SGD momentum.", lower=0.0)
    weight_decay: float = option(2e-4, "L2 weight decay (coupled, as PyTorch SGD).", lower=0.0)
    milestones: tuple[int, ...] = option((215, 260, 285), "Epochs at which lr, weight_rate and temperature_rate "
                                         "are multiplied by --decay.", check=_epochs_check())
    decay: float = option(0.1, "Decay factor at each milestone.", lower=0.0)


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """Entropy-Based Balance and Normalization Loss Balance (B-MTARD, TPAMI 2024; resnet18_mtard_cifar10.py), and
    MTARD's loss-weight rule (ECCV 2022)."""
    weight_rate: float = option(0.025, "eta_w: learning rate of the loss weights.", lower=0.0)
    temperature_rate: float = option(0.001, "eta_tau: learning rate of the teacher temperatures.", lower=0.0)
    temperature_min: float = option(1.0, "Lower bound of the teacher temperatures.",
                                    check=(lambda v: v > 0, "must be positive"))
    temperature_max: float = option(10.0, "Upper bound of the teacher temperatures.", lower=0.0)
    beta: float = option(1.0, "Power of the relative loss progress in the weight rule (MTARD).")
    kl_scale: float = option(1.0, "Multiplies the distillation KL terms of b_mtard, mtard and rslad (10 in their "
                             "reference code for CIFAR-100; AdaAD's code changes its reduction instead).", lower=0.0)

    def __post_init__(self):
        if self.temperature_min > self.temperature_max:
            raise ConfigError("--temperature_min must not exceed --temperature_max")


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """The single-teacher and adversarial-training methods, with their papers' defaults."""
    trades_beta: float = option(6.0, "TRADES beta (the trades student and a TRADES-trained teacher).", lower=0.0)
    ard_temperature: float = option(30.0, "ARD: distillation temperature tau.",
                                    check=(lambda v: v > 0, "must be positive"))
    ard_alpha: float = option(1.0, "ARD: weight of the tau^2 KL term; 1 - alpha weighs CE on clean images.",
                              lower=0.0, upper=1.0)
    rslad_adv_weight: float = option(5 / 6, "RSLAD: weight of the KL on adversarial images (1 - w on clean).",
                                     lower=0.0, upper=1.0)
    adaad_alpha: float = option(1.0, "AdaAD: weight of the KL on adversarial images (1 - alpha on clean).",
                                lower=0.0, upper=1.0)


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """One teacher: a given .keras file, or how this app trains it (--mode=train_teacher, and --mode=all when the
    file is missing). The same type serves the clean and the robust teacher; their flags are --<kind>_teacher_*."""
    file: str = option("", "The {kind} teacher, a .keras file (default: <model_dir>/teachers/{kind}.keras, trained "
                       "when missing).", flag="")
    arch: str = option("resnet56", "{Kind} teacher architecture: NAME or NAME:key=value,... (see "
                       "models/architectures.py).")
    method: str = option("natural", "Training of the {kind} teacher: natural, trades (TRADES) or pgd_at (PGD-AT).",
                         choices=TEACHER_METHODS)
    epochs: int = option(200, "Epochs of the {kind} teacher's training.", lower=1)
    learning_rate: float = option(0.1, "SGD learning rate of the {kind} teacher's training.", lower=0.0)
    schedule: str = option("cosine", "Learning-rate schedule of the {kind} teacher.", choices=("cosine", "step"))
    milestones: tuple[int, ...] = option((100, 150), "Step-schedule epochs (x --decay) of the {kind} teacher.",
                                         check=_epochs_check())


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    """Which trained student student.keras is (ModelSelection in job/runs.py)."""
    select: str = option("last", "Which student student.keras is: last (the last epoch's); best_test (the B-MTARD "
                         "reference's protocol: the best (clean + PGD-TRADES-20)/2 on the test split, at epoch 1, every "
                         "--select_every_before epochs before the first milestone and every epoch from it; its test "
                         "figures are optimistic); best_holdout (the same on --holdout_examples train images kept out "
                         "of training). The last model is kept as student_last.keras.", flag="select",
                         choices=SELECT_MODES)
    every_before: int = option(20, "Selection evaluation every N epochs before the first milestone.",
                               flag="select_every_before", lower=1)
    examples: int | None = option(None, "Images of the selection split evaluated (default: all of it).",
                                  flag="select_examples", lower=1)
    holdout_examples: int = option(1000, "With --select=best_holdout: the last N train images, kept out of training "
                                   "(teachers trained by this run too) for selection.", flag="holdout_examples",
                                   lower=1)

    def held_out(self):
        """How many train examples the run keeps out of training (for best_holdout selection)."""
        return self.holdout_examples if self.select == "best_holdout" else 0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The robustness evaluation (the paper's attacks: FGSM, PGD-SAT, PGD-TRADES, CW-inf, AutoAttack)."""
    attacks: tuple[str, ...] = option(ATTACK_NAMES, "Attacks of the evaluation.", flag="attacks",
                                      check=(lambda v: bool(v) and set(v) <= set(ATTACK_NAMES),
                                             "must be a subset of " + ",".join(ATTACK_NAMES)))
    num_examples: int | None = option(None, "Evaluate on the first N test images (default: all).",
                                      flag="num_eval_examples", lower=1)
    batch_size: int = option(250, "Images per evaluation batch.", flag="eval_batch_size", lower=1)
    source_model: str = option("", "The float Keras student (.keras) a .tflite --model was converted from, required "
                               "to evaluate a .tflite file: the transfer attacks (PGD-20, APGD-CE) are crafted on it, "
                               "and its own figures under the same attacks are reported beside the TFLite model's.",
                               flag="source_model")
    square_queries: int = option(5000, "Queries of the Square attack run directly against each model when --model is "
                                 "a .tflite file (AutoAttack's Square keeps its standard 5000).",
                                 flag="square_queries", lower=1)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """The export of the student: a TF Serving SavedModel or a TensorFlow Lite file."""
    export_dir: str = option("saved_models", "Root of the exported model directories (TF Serving's, which also hold "
                             "the .tflite files).", flag="export_dir")
    model_name: str = option("mtard_student", "Model name under --export_dir (TF Serving's model name).",
                             flag="model_name")
    version: int | None = option(None, "Export version (default: the next free one).", flag="model_version",
                                 lower=1)
    precision: str = option("float32", "Dtype policy of the exported model (the saved weights are float32 whatever "
                            "the training precision): mixed_bfloat16 / mixed_float16 serve in 16 bits.",
                            flag="export_precision", choices=PRECISIONS)
    format: str = option("savedmodel", "savedmodel: a TF Serving SavedModel version directory; tflite: "
                         "<export_dir>/<model_name>/<version>.tflite for the TensorFlow Lite interpreter (the same "
                         "version numbering; input float32 images in [0, 1], output logits).", flag="format",
                         choices=EXPORT_FORMATS)
    quantize: str = option("none", "Numeric format of a --format=tflite export: none (float32), float16 (float16 "
                           "weights), int8 (full-integer post-training quantisation calibrated on "
                           "--representative_examples train images; float32 input and output).", flag="quantize",
                           choices=QUANTIZATIONS)
    representative_examples: int = option(500, "The first N train images, which calibrate the activation ranges of "
                                          "--quantize=int8.", flag="representative_examples", lower=1)

    def __post_init__(self):
        if self.quantize != "none" and self.format != "tflite":
            raise ConfigError("--quantize applies to --format=tflite")
        if self.format == "tflite" and self.precision != "float32":
            raise ConfigError("--export_precision applies to --format=savedmodel: a TFLite model is converted from "
                              "the float32 student (--quantize sets its numeric format)")


def _teacher(**defaults):
    return lambda: TeacherConfig(**defaults)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs. Flags: the fields of each group (prefix "" unless the group names one)."""
    method: str = option("b_mtard", "How the student is trained (the methods of the paper's tables): b_mtard, mtard "
                         "(two teachers); ard, rslad, adaad (robust teacher); sat (PGD-AT), trades, natural (no "
                         "teacher).", choices=METHOD_NAMES)
    student: str = option("resnet18", "Student architecture: NAME or NAME:key=value,... (see models/architectures.py).")
    strip_softmax: bool = option(False, "Remove a final softmax from the model files loaded (teachers, --model, "
                                 "--source_model): they must output logits, and a model saved with a final softmax "
                                 "outputs probabilities, which is refused otherwise.")
    data: DataConfig = option(None, "", factory=DataConfig)
    runtime: RuntimeConfig = option(None, "", factory=RuntimeConfig)
    attack: AttackConfig = option(None, "", factory=AttackConfig)
    schedule: ScheduleConfig = option(None, "", factory=ScheduleConfig)
    balance: BalanceConfig = option(None, "", factory=BalanceConfig)
    baselines: BaselineConfig = option(None, "", factory=BaselineConfig)
    clean_teacher: TeacherConfig = option(None, "", flag="clean_teacher_", factory=_teacher())
    robust_teacher: TeacherConfig = option(None, "", flag="robust_teacher_", factory=_teacher(
        arch="wrn34_10", method="trades", epochs=100, schedule="step", milestones=(75, 90)))
    selection: SelectionConfig = option(None, "", factory=SelectionConfig)
    eval: EvalConfig = option(None, "", factory=EvalConfig)
    export: ExportConfig = option(None, "", factory=ExportConfig)

    def teacher(self, kind):
        """The clean or the robust teacher's configuration."""
        if kind not in ("clean", "robust"):
            raise ValueError(f"unknown teacher '{kind}', expected clean or robust")
        return self.clean_teacher if kind == "clean" else self.robust_teacher

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


# ----------------------------------------------------------------------------------------------------------------
# Flags derived from the dataclasses
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag: its name, where its value lives in a Config (`path`), its type and its field's metadata."""
    name: str
    path: tuple
    type: typing.Any
    default: typing.Any
    metadata: dict
    kind: str  # the teacher kind ("clean"/"robust") for a teacher's option, else ""
    cli: bool  # a command-line flag (False: a setting for code only, e.g. `verbose`)


def _default(field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def options(cls=Config, prefix="", path=(), defaults=None, kind=""):
    """Every setting of `cls`, depth first: [Option] (flags, and the few settings without a flag)."""
    found = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        value = getattr(defaults, field.name) if defaults is not None else _default(field)
        flag = field.metadata.get("flag")
        if dataclasses.is_dataclass(hints[field.name]):
            group_prefix = flag if isinstance(flag, str) else prefix
            group_kind = field.name[:-len("_teacher")] if field.name.endswith("_teacher") else kind
            found += options(hints[field.name], group_prefix, path + (field.name,), value, group_kind)
        else:
            name = (prefix.rstrip("_") if flag == "" else flag) if isinstance(flag, str) else prefix + field.name
            found.append(Option(name, path + (field.name,), hints[field.name], value, dict(field.metadata), kind,
                                flag is not False))
    return found


def _base_type(annotation):
    """int for `int | None`, tuple's element type for `tuple[int, ...]`, else the annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(annotation) is tuple:
        return tuple, args[0]
    if args:
        return args[0], None
    return annotation, None


def _help(option_):
    text = option_.metadata["help"]
    return text.format(kind=option_.kind, Kind=option_.kind.capitalize()) if option_.kind else text


def define_flags(flag_values, names=None):
    """Defines one absl flag per configuration field (defaults from the dataclasses) on `flag_values`, or only the
    flags in `names` (a tool that shares some of the run's flags); flags defined before are kept, so the commands'
    definitions, each of them all or part of these, may share a process (tests).

    Every command defines its flags the same way: in its `define_flags(flag_values)`, which its `run()` calls before
    absl parses the command line, never on import, so every module of the package imports in one process."""
    for option_ in options():
        if not option_.cli or option_.name in flag_values or (names is not None and option_.name not in names):
            continue
        base, element = _base_type(option_.type)
        meta = option_.metadata
        args = dict(name=option_.name, help=_help(option_), flag_values=flag_values)
        default = option_.default
        if meta["choices"]:
            flags.DEFINE_enum(default=default, enum_values=list(meta["choices"]), **args)
        elif base is bool:
            flags.DEFINE_boolean(default=default, **args)
        elif base is int:
            flags.DEFINE_integer(default=default, lower_bound=meta["lower"], upper_bound=meta["upper"], **args)
        elif base is float:
            flags.DEFINE_float(default=default, lower_bound=meta["lower"], upper_bound=meta["upper"], **args)
        elif base is tuple:
            flags.DEFINE_list(default=[str(v) for v in default], **args)
        else:
            flags.DEFINE_string(default=default, **args)
        if meta["check"]:
            predicate, message = meta["check"]
            flags.register_validator(option_.name, _checked(predicate, base, element),
                                     f"--{option_.name} {message}", flag_values=flag_values)


def _checked(predicate, base, element):
    def validate(value):
        if value is None:
            return True
        try:
            return predicate(_convert(value, base, element))
        except ValueError:
            return False
    return validate


def _convert(value, base, element):
    """A flag's value as the field's type: a list flag's strings become a tuple of `element`s."""
    if base is tuple and value is not None:
        return tuple(element(v.strip()) for v in value if v.strip())
    return value


def _set(config, values):
    """`config` with {path: value} applied, each group rebuilt once (so its cross-field rules see all new values)."""
    fields, groups = {}, {}
    for path, value in values.items():
        if len(path) == 1:
            fields[path[0]] = value
        else:
            groups.setdefault(path[0], {})[path[1:]] = value
    fields.update({name: _set(getattr(config, name), group) for name, group in groups.items()})
    return dataclasses.replace(config, **fields)


def replace(config, **values):
    """`config` with settings by their flag names, e.g. replace(config, epochs=3, attack_steps=5) (ConfigError for
    an unknown name or a value out of the cross-field rules)."""
    by_name = {option_.name: option_ for option_ in options()}
    by_path = {}
    for name, value in values.items():
        if name not in by_name:
            raise ConfigError(f"unknown setting --{name}")
        base, element = _base_type(by_name[name].type)
        if base is tuple and value is not None:
            value = _convert(value, base, element) if all(isinstance(v, str) for v in value) else tuple(value)
        by_path[by_name[name].path] = value
    return _set(config, by_path)


def make(**values):
    """Config() with settings by flag name (replace)."""
    return replace(Config(), **values)


def from_flags(flag_values, names=None):
    """The Config of parsed flags (`names`: only these flags, the rest at their defaults)."""
    values = {}
    for option_ in options():
        if option_.cli and (names is None or option_.name in names):
            base, element = _base_type(option_.type)
            values[option_.name] = _convert(flag_values[option_.name].value, base, element)
    return replace(Config(), **values)


def check_split_sizes(config, num_train, num_test, test_split):
    """Raises ConfigError where the run asks for more images than the dataset's splits hold (a clamp would report
    on fewer images than asked, unsaid): --num_eval_examples or best_test's --select_examples against the
    evaluation split, best_holdout's --holdout_examples against the train split (one image at least stays to train
    on) and its --select_examples against the holdout."""
    selection, name = config.selection, config.data.dataset
    limits = [("num_eval_examples", config.eval.num_examples, num_test, f"the {test_split} split of '{name}'")]
    if selection.select == "best_test":
        limits.append(("select_examples", selection.examples, num_test, f"the {test_split} split of '{name}'"))
    if selection.select == "best_holdout":
        limits.append(("holdout_examples", selection.holdout_examples, num_train - 1,
                       f"the train split of '{name}' less one image to train on"))
        limits.append(("select_examples", selection.examples, selection.holdout_examples, "the holdout"))
    for flag, count, limit, what in limits:
        if count is not None and count > limit:
            raise ConfigError(f"--{flag}={count} asks for more images than {what} holds ({limit})")


def read_flagfile(path):
    """{flag name: value} of the flags set in a flagfile (`--name=value` lines, `#` comments), parsed by absl with
    the configuration's own flags, so a value is checked and converted exactly as on the command line. Raises
    ConfigError naming the file for an unknown flag or a bad value."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        rest = flag_values(["flagfile", f"--flagfile={path}"])
    except flags.Error as error:
        raise ConfigError(f"{path}: {error}") from None
    if len(rest) > 1:
        raise ConfigError(f"{path}: expected --name=value lines, got '{' '.join(rest[1:])}'")
    found = {}
    for option_ in options():
        if option_.cli and flag_values[option_.name].present:
            base, element = _base_type(option_.type)
            found[option_.name] = _convert(flag_values[option_.name].value, base, element)
    return found
