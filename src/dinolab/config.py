"""One typed configuration for a DINO run.

The dataclass defaults are the reference recipe of Caron et al. (2021): ViT-S/16, 2x224 + 8x96
crops, K = 65536, AdamW at 5e-4 per 256 images, cosine schedules (see DINO_SPEC.md). Presets in
``dinolab/presets`` hold only deviations from these defaults; the command line adds dotted
overrides on top. ``load_config`` merges the three layers and validates the result; derived
quantities (the scaled learning rate, step counts) are computed by pure functions elsewhere and
never written back into the config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinolab.auto import AUTO, AUTO_KEYS, get, set_value


class ConfigError(ValueError):
    """A configuration mistake; the CLI prints the message as one line and exits with status 2."""


@dataclass
class DataConfig:
    # folder | filelist | imagenet | stl10 | cifar10 | cifar100 | mnist | fashion-mnist | hf
    source: str = "folder"
    # the image folder, the .txt/.csv file list, or where a named data set's files are
    # ("" searches the usual places: ./data, and Debian's folder for Fashion-MNIST); hf: a
    # save_to_disk folder, a folder of parquet files or a Hub name (data/hugging_face.py)
    root: str = ""
    split: str = ""  # the split trained on; "" is the source's default (DATA_SPLITS; hf: train)
    # hf: the columns of the images and the labels; "": the first Image column, and the first
    # ClassLabel column or one named label(s) (labels feed only the k-NN monitor)
    image_column: str = ""
    label_column: str = ""
    download: bool = False  # named data sets: let torchvision fetch missing files
    # Unreadable files are skipped and replaced; more than this fraction of the samples read
    # failing stops the run (judged over at least one epoch's worth of samples)
    max_bad_fraction: float = 0.01
    num_workers: int = 8
    # pil: each worker builds the views of its images with PIL; batched: workers only decode,
    # and the views of a whole batch are made on the training device (data/batched_augment.py);
    # auto: batched on GPUs (2.6x faster end to end on an H100, docs/benchmarks.md), else pil
    augmentation: str = "auto"
    # batched views on CUDA: make the next micro-batch's views on a side stream while the
    # current step runs (off until measured on a GPU: docs/LOG.md); changes nothing elsewhere
    prefetch_views: bool = False
    # workers: the loader's workers decode every image; device (batched augmentation only):
    # workers read JPEG files undecoded and the main process decodes each batch's JPEGs in one
    # call on the training device (nvJPEG; data/device_decode.py). Helps only on CUDA
    decode: str = "workers"
    global_crop_size: int = 224
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    num_local_crops: int = 8
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # global 1, global 2, each local
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.2  # second global view only
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    eval_resize_ratio: float = 256 / 224  # evaluation: resize to size * ratio, center crop size
    # method=dinov2's iBOT: the fraction of the student's global views that get a block mask,
    # and the range their masked fractions are spread evenly over (DINOv2's collate)
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)


@dataclass
class HeadConfig:
    out_dim: Any = AUTO  # K: an int, or auto (dinolab/auto.py: by the data set's size)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm: str = "none"  # none | batch | layer
    norm_last_layer: bool = True


@dataclass
class ByolHeadConfig:
    hidden_dim: int = 4096
    out_dim: int = 256
    # The predictor's learning rate, as a multiple of the schedule's (the paper's 1; a faster
    # predictor, as SimSiam's and DirectPred's, helped short [CLS] runs: docs/LOG.md, 2026-12-07)
    predictor_lr_scale: float = 1.0


@dataclass
class ModelConfig:
    backbone: str = "vit_small_patch16_224"
    pretrained: bool = False
    weights: str | None = None  # a local file of backbone weights (safetensors or torch)
    patch_size: int | None = None  # ViTs: override the model's patch size
    drop_path_rate: float = 0.1  # student only; the teacher has none
    # timm attention: fused (scaled_dot_product_attention) or eager; auto: fused on GPUs, eager
    # on CPUs, where it made the demo's step 1.4x faster (17-token sequences; docs/LOG.md)
    attention: str = "auto"
    # Student only: recompute each block's activations in the backward instead of keeping them
    # (timm's set_grad_checkpointing). Much less memory for a longer step; same numbers.
    grad_checkpointing: bool = False
    # ViTs: register tokens (timm's reg_tokens, Darcet et al. 2024), kept out of every loss
    num_registers: int = 0
    # method=dinov2: a second head of the same shape for the iBOT patch loss (shared: false)
    ibot_separate_head: bool = False
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)  # passed to timm.create_model
    head: HeadConfig = field(default_factory=HeadConfig)
    # method=byol: the projector (and the online network's predictor) MLP widths
    byol: ByolHeadConfig = field(default_factory=ByolHeadConfig)


@dataclass
class LossConfig:
    student_temp: float = 0.1
    # auto (dinolab/auto.py): by the data set's size; the reference's 0.04, 0.04, 0 from 1M on
    teacher_temp: Any = AUTO
    warmup_teacher_temp: Any = AUTO
    warmup_teacher_temp_epochs: Any = AUTO
    center_momentum: float = 0.9
    # DINOv2's terms (method=dinov2; blank: the method's default, 0.1 and 1.0; dino has none)
    koleo_weight: float | None = None
    ibot_weight: float | None = None
    # The teacher's [CLS] and patch targets: mean (DINO's EMA centre, then a softmax) or
    # sinkhorn (Sinkhorn-Knopp over the global batch, 3 iterations; DINOv2 Sec. 4)
    centering: str = "mean"


@dataclass
class OptimConfig:
    lr: float = 5e-4  # per 256 images; the peak LR is lr * batch_size / 256
    min_lr: float = 1e-6
    # auto (dinolab/auto.py): a share of the run's steps; the reference's 10 epochs from 1M on
    warmup_epochs: Any = AUTO
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 3.0  # per parameter tensor, as the reference; 0 disables
    freeze_last_layer_epochs: Any = AUTO  # auto: none for short runs; 1 epoch from 1M on
    teacher_momentum: Any = AUTO  # auto: 1 - 10 / steps within [0.99, 0.996]
    teacher_momentum_end: float = 1.0
    # How the prototype layer is frozen: gradients (DINO: dropped, AdamW's moments untouched)
    # or lr (DINOv2: a learning rate of 0, the moments keep accumulating)
    freeze_last_layer_by: str = "gradients"


@dataclass
class TrainConfig:
    epochs: Any = AUTO  # auto: about 40k / 120k images seen by data-set size; 100 from 1M on
    # images per optimizer step, over all processes and micro-batches; auto: about N / 400 in
    # [32, 1024] (dinolab/auto.py), the reference's 1024 from 1M images on
    batch_size: Any = AUTO
    accumulation_steps: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 where native, else fp32)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    deterministic: bool = True  # deterministic algorithms (CPU runs are reproducible bit for bit)
    limit_steps_per_epoch: int = 0  # >0: shorten each epoch (smoke tests, quick looks)
    compile: bool = False  # torch.compile the backbones and heads (student and teacher)
    # Several processes: ddp keeps a full student on each; fsdp shards the student's and the
    # teacher's parameters, gradients and optimizer state over them (for models DDP cannot fit)
    parallel: str = "ddp"


@dataclass
class EvalConfig:
    knn_every_epochs: int = 10  # 0: only at the start and the end
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_limit: int = 0  # 0: all labelled train images; else a fixed random subset
    knn_test_limit: int = 0
    batch_size: int = 256


@dataclass
class RunConfig:
    dir: str = "runs/dino"
    keep_every_epochs: int = 0  # also keep checkpoint_EEEE.pt every N epochs; 0: none
    # step checkpoints kept (checkpoint_step_S.pt; checkpoint.pt is the newest): >= 2 leaves
    # one to resume from when the newest is damaged
    keep_last_checkpoints: int = 2
    # also save mid-epoch when this much wall-clock time has passed since the last save: what a
    # crash or a kill can lose at most; 0: only at the end of each epoch
    checkpoint_every_minutes: float = 20.0
    log_every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = True
    # Weights & Biases (pip install 'dinolab[wandb]'): the TensorBoard scalars and images, the
    # resolved config and the k-NN results, from the main process; WANDB_MODE=offline needs no
    # network. The W&B run's id is kept in run.dir/wandb_id: a resumed run continues it
    wandb: bool = False
    wandb_project: str = "dinolab"
    wandb_entity: str = ""  # "": W&B's default (WANDB_ENTITY, else the account's)
    wandb_name: str = ""  # "": a name W&B makes up
    wandb_tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    method: str = "dino"  # dino | dinov2 | byol: the objective (dinolab/methods)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)


DEFAULT_PRESET = "demo"
DATA_SOURCES = ("folder", "filelist", "imagenet", "stl10", "cifar10", "cifar100", "mnist",
                "fashion-mnist", "hf")
# The splits each source can train on, its default first ("" where a source has no splits).
DATA_SPLITS = {
    "folder": ("",), "filelist": ("",), "imagenet": ("train", "val"),
    "stl10": ("train+unlabeled", "unlabeled", "train", "test"),
    "cifar10": ("train", "test"), "cifar100": ("train", "test"), "mnist": ("train", "test"),
    "fashion-mnist": ("train", "test"),
}
AUGMENTATIONS = ("auto", "pil", "batched")
DECODES = ("workers", "device")
ATTENTIONS = ("auto", "fused", "eager")
METHODS = ("dino", "dinov2", "byol")
CENTERINGS = ("mean", "sinkhorn")
DINOV2_WEIGHTS = ("koleo_weight", "ibot_weight")  # loss.*: DINOv2's terms, method=dinov2 only
DINOV2_LOSS_KEYS = (*DINOV2_WEIGHTS, "centering")  # reset when a layer names another method


def preset_names() -> list[str]:
    files = resources.files("dinolab") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_base(preset_or_yaml: str | None) -> DictConfig:
    name = preset_or_yaml or DEFAULT_PRESET
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"config file not found: {name}")
        text = path.read_text()
    elif name in preset_names():
        text = (resources.files("dinolab") / "presets" / f"{name}.yaml").read_text()
    else:
        raise ConfigError(
            f"unknown preset {name!r}; presets: {', '.join(preset_names())} (or a path to a .yaml)"
        )
    try:
        loaded = OmegaConf.create(text)
    except Exception as error:  # yaml.YAMLError and OmegaConf's own errors
        raise ConfigError(f"{name}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{name}: expected a mapping of config keys")
    return loaded


def load_config(preset_or_yaml: str | None = None, overrides: list[str] | None = None) -> Config:
    """Schema defaults <- preset or YAML file <- ``key=value`` overrides, then validated."""
    overrides = overrides or []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
    merged = OmegaConf.structured(Config)
    try:
        for layer in (_read_base(preset_or_yaml), OmegaConf.from_dotlist(overrides)):
            merged = _reset_method_loss(_reset_backbone_kwargs(merged, layer), layer)
            merged = OmegaConf.merge(merged, layer)
        config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as error:
        raise ConfigError(_describe(error)) from None
    _normalise(config)
    validate(config)
    return config


def _reset_backbone_kwargs(merged: DictConfig, layer: DictConfig) -> DictConfig:
    """model.backbone_kwargs belong to one backbone: a layer that names another backbone, or
    gives its own kwargs, replaces them instead of merging key by key."""
    model = layer.get("model") or {}
    new_backbone = "backbone" in model and model["backbone"] != merged.model.backbone
    if new_backbone or "backbone_kwargs" in model:
        merged = merged.copy()
        OmegaConf.update(merged, "model.backbone_kwargs", {}, merge=False)
    return merged


def _reset_method_loss(merged: DictConfig, layer: DictConfig) -> DictConfig:
    """DINOv2's loss keys (its term weights, Sinkhorn-Knopp centering) belong to the method a
    preset names: a layer that names another method puts those set before it back to the
    schema's defaults, so ``dinolab train method=dino`` on the demo preset trains the paper's
    DINO. Set in the same layer as a method without them, they are validated as usual."""
    if "method" not in layer or layer["method"] == merged.method:
        return merged
    merged = merged.copy()
    defaults = LossConfig()
    for key in DINOV2_LOSS_KEYS:
        OmegaConf.update(merged, f"loss.{key}", getattr(defaults, key), merge=False)
    return merged


def _normalise(config: Config) -> None:
    """Paths get ``~`` expanded; tuple fields (OmegaConf gives lists) become tuples of the
    declared length, or a ConfigError naming the key."""
    config.data.root = os.path.expanduser(config.data.root)
    config.run.dir = os.path.expanduser(config.run.dir)
    if config.model.weights:
        config.model.weights = os.path.expanduser(config.model.weights)
    for key in AUTO_KEYS:  # a YAML 2 where a float is meant: 2.0, as the typed keys get it
        value = get(config, key)
        if key not in INTEGER_AUTO_KEYS and isinstance(value, int) and not isinstance(value, bool):
            set_value(config, key, float(value))
    for section_name in ("data", "optim"):
        section = getattr(config, section_name)
        for item in dataclasses.fields(section):
            value = getattr(section, item.name)
            if isinstance(value, (list, tuple)):
                expected = len(getattr(type(section)(), item.name))
                if len(value) != expected:
                    raise ConfigError(f"invalid value for {section_name}.{item.name}: expected "
                                      f"{expected} numbers, got {len(value)}")
                setattr(section, item.name, tuple(value))


def _describe(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or "?"
    message = str(error).splitlines()[0]
    if "Key" in type(error).__name__ or "not in struct" in message:
        return f"unknown config key: {key}"
    return f"invalid value for {key}: {message}"


def to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(config))  # type: ignore[return-value]


def from_dict(values: dict[str, Any]) -> Config:
    merged = OmegaConf.merge(OmegaConf.structured(Config), values)
    config: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _normalise(config)
    return config


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"invalid value for {key}: {message}")


# The keys of AUTO_KEYS that take whole numbers; the others take any number.
INTEGER_AUTO_KEYS = ("train.batch_size", "train.epochs", "model.head.out_dim",
                     "loss.warmup_teacher_temp_epochs")


def _unset(value: Any) -> bool:
    """Left at auto: resolved at the start of a run (dinolab/auto.py), checked then."""
    return bool(value == AUTO)


def require_resolved(config: Config, keys: tuple[str, ...] = AUTO_KEYS) -> None:
    """A ConfigError if any of ``keys`` is still auto: building a network or a training state
    needs numbers, which a run resolves from its data set's size (dinolab/auto.py)."""
    left = [key for key in keys if _unset(get(config, key))]
    if left:
        raise ConfigError(f"{', '.join(left)} still auto: resolve them for the data set's size "
                          "first (dinolab.auto.resolve(config, num_images))")


def _check_auto_keys(config: Config) -> None:
    """The schema types these keys loosely (a number or auto): their types are checked here."""
    for key in AUTO_KEYS:
        value = get(config, key)
        if _unset(value):
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = key in INTEGER_AUTO_KEYS
        _require(number and (isinstance(value, int) or not whole), key,
                 f"must be {'a whole number' if whole else 'a number'} or auto, got {value!r}")


def validate(config: Config) -> None:
    """Reject impossible values before any work starts; the message names the key."""
    data, head, loss, optim, train = (
        config.data, config.model.head, config.loss, config.optim, config.train
    )
    _require(data.source in DATA_SOURCES, "data.source", f"must be one of {DATA_SOURCES}")
    if data.source in DATA_SPLITS:
        splits = DATA_SPLITS[data.source]
        _require(data.split in ("", *splits), "data.split",
                 f"data.source={data.source} has no splits" if splits == ("",)
                 else f"must be one of {splits} for data.source={data.source}")
    _require(0 <= data.max_bad_fraction <= 1, "data.max_bad_fraction", "must be in [0, 1]")
    for key in ("image_column", "label_column"):
        _require(not getattr(data, key) or data.source == "hf", f"data.{key}",
                 "only data.source=hf has columns")
    glued = [str(key) for key, value in config.model.backbone_kwargs.items()
             if value is None and ":" in str(key)]
    _require(not glued, "model.backbone_kwargs",
             f"{glued[0] if glued else ''!r} is one key with no value: write a space after "
             "the colon ({depth: 2}, not {depth:2})")
    _require(data.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(data.augmentation in AUGMENTATIONS, "data.augmentation",
             f"must be one of {AUGMENTATIONS}")
    _require(data.decode in DECODES, "data.decode", f"must be one of {DECODES}")
    pil = data.augmentation == "pil" or (data.augmentation == "auto" and train.device == "cpu")
    _require(data.decode == "workers" or not pil, "data.decode",
             "device needs the batched augmentation (data.augmentation=batched, or auto on a GPU)")
    _require(config.model.attention in ATTENTIONS, "model.attention",
             f"must be one of {ATTENTIONS}")
    _require(data.global_crop_size > 0, "data.global_crop_size", "must be > 0")
    _require(data.local_crop_size > 0, "data.local_crop_size", "must be > 0")
    _require(
        data.local_crop_size <= data.global_crop_size,
        "data.local_crop_size",
        f"{data.local_crop_size} is larger than the global crop ({data.global_crop_size})",
    )
    _require(data.num_local_crops >= 0, "data.num_local_crops", "must be >= 0")
    for key in ("global_crop_scale", "local_crop_scale", "blur_sigma", "mask_ratio"):
        low, high = getattr(data, key)
        _require(0 < low <= high, f"data.{key}", f"needs 0 < low <= high, got ({low}, {high})")
    for key in ("global_crop_scale", "local_crop_scale"):
        _require(getattr(data, key)[1] <= 1, f"data.{key}", "the upper bound must be <= 1")
    probabilities = ["flip_prob", "color_jitter_prob", "grayscale_prob", "solarize_prob"]
    for key in probabilities:
        _require(0 <= getattr(data, key) <= 1, f"data.{key}", "must be a probability in [0, 1]")
    _require(all(0 <= p <= 1 for p in data.blur_probs), "data.blur_probs", "must be in [0, 1]")
    _require(all(s > 0 for s in data.std), "data.std", "must be > 0")
    _require(data.eval_resize_ratio >= 1, "data.eval_resize_ratio", "must be >= 1")
    _require(0 <= data.mask_probability <= 1, "data.mask_probability", "must be in [0, 1]")
    _require(data.mask_ratio[1] < 1, "data.mask_ratio", "the upper bound must be < 1")

    _check_auto_keys(config)
    _require(head.out_dim == AUTO or head.out_dim > 0, "model.head.out_dim", "must be > 0")
    _require(head.hidden_dim > 0, "model.head.hidden_dim", "must be > 0")
    _require(head.bottleneck_dim > 0, "model.head.bottleneck_dim", "must be > 0")
    _require(head.num_layers >= 1, "model.head.num_layers", "must be >= 1")
    _require(head.norm in ("none", "batch", "layer"), "model.head.norm", "none, batch or layer")
    _require(config.model.num_registers >= 0, "model.num_registers", "must be >= 0")
    for key in ("hidden_dim", "out_dim"):
        _require(getattr(config.model.byol, key) > 0, f"model.byol.{key}", "must be > 0")
    _require(config.model.byol.predictor_lr_scale > 0, "model.byol.predictor_lr_scale",
             "must be > 0")
    _require(0 <= config.model.drop_path_rate < 1, "model.drop_path_rate", "must be in [0, 1)")
    _require(
        config.model.patch_size is None or config.model.patch_size > 0,
        "model.patch_size",
        "must be > 0",
    )

    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        _require(_unset(getattr(loss, key)) or getattr(loss, key) > 0, f"loss.{key}",
                 "a temperature must be > 0")
    _require(_unset(loss.warmup_teacher_temp_epochs) or loss.warmup_teacher_temp_epochs >= 0,
             "loss.warmup_teacher_temp_epochs", ">= 0")
    _require(0 <= loss.center_momentum < 1, "loss.center_momentum", "must be in [0, 1)")
    _require(config.method in METHODS, "method", f"must be one of {METHODS}")
    _require(loss.centering in CENTERINGS, "loss.centering", f"must be one of {CENTERINGS}")
    for key in DINOV2_WEIGHTS:
        weight = getattr(loss, key)
        _require(weight is None or weight >= 0, f"loss.{key}", "must be >= 0")
        _require(not weight or config.method == "dinov2", f"loss.{key}",
                 f"DINOv2's term needs method=dinov2 (method={config.method})")
    _require(loss.centering == "mean" or config.method != "byol", "loss.centering",
             "BYOL has no teacher distribution to centre")

    _require(0 < optim.lr < math.inf, "optim.lr", "must be > 0 and finite")
    _require(0 <= optim.min_lr <= optim.lr, "optim.min_lr", "must be in [0, optim.lr]")
    _require(_unset(optim.warmup_epochs) or optim.warmup_epochs >= 0, "optim.warmup_epochs",
             "must be >= 0")
    _require(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(optim.weight_decay_end >= 0, "optim.weight_decay_end", "must be >= 0")
    _require(all(0 <= b < 1 for b in optim.betas), "optim.betas", "must be in [0, 1)")
    _require(optim.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables)")
    _require(_unset(optim.freeze_last_layer_epochs) or optim.freeze_last_layer_epochs >= 0,
             "optim.freeze_last_layer_epochs", ">= 0")
    _require(optim.freeze_last_layer_by in ("gradients", "lr"), "optim.freeze_last_layer_by",
             "gradients or lr")
    for key in ("teacher_momentum", "teacher_momentum_end"):
        _require(_unset(getattr(optim, key)) or 0 <= getattr(optim, key) <= 1, f"optim.{key}",
                 "must be in [0, 1]")

    _require(_unset(train.epochs) or train.epochs > 0, "train.epochs", "must be > 0")
    _require(_unset(train.batch_size) or train.batch_size > 0, "train.batch_size", "must be > 0")
    _require(train.accumulation_steps >= 1, "train.accumulation_steps", "must be >= 1")
    _require(
        _unset(train.batch_size) or train.batch_size % train.accumulation_steps == 0,
        "train.batch_size",
        f"{train.batch_size} is not divisible by train.accumulation_steps",
    )
    _require(
        train.precision in ("auto", "fp32", "bf16", "fp16"),
        "train.precision",
        "auto, fp32, bf16 or fp16",
    )
    _require(train.device in ("auto", "cpu", "cuda"), "train.device", "auto, cpu or cuda")
    _require(train.parallel in ("ddp", "fsdp"), "train.parallel", "ddp or fsdp")
    _require(train.limit_steps_per_epoch >= 0, "train.limit_steps_per_epoch", "must be >= 0")

    evaluation = config.eval
    _require(evaluation.knn_every_epochs >= 0, "eval.knn_every_epochs", "must be >= 0")
    _require(evaluation.knn_k > 0, "eval.knn_k", "must be > 0")
    _require(evaluation.knn_temperature > 0, "eval.knn_temperature", "must be > 0")
    _require(evaluation.knn_train_limit >= 0, "eval.knn_train_limit", "must be >= 0")
    _require(evaluation.knn_test_limit >= 0, "eval.knn_test_limit", "must be >= 0")
    _require(evaluation.batch_size > 0, "eval.batch_size", "must be > 0")

    _require(bool(config.run.dir), "run.dir", "must not be empty")
    _require(config.run.keep_every_epochs >= 0, "run.keep_every_epochs", "must be >= 0")
    _require(config.run.keep_last_checkpoints >= 1, "run.keep_last_checkpoints", "must be >= 1")
    _require(0 <= config.run.checkpoint_every_minutes < math.inf, "run.checkpoint_every_minutes",
             "must be >= 0 and finite (0: only at the end of each epoch)")
    _require(config.run.log_every_steps > 0, "run.log_every_steps", "must be > 0")
    _require(bool(config.run.wandb_project), "run.wandb_project", "must not be empty")
    _require(all(0 < len(tag) <= 64 for tag in config.run.wandb_tags), "run.wandb_tags",
             "W&B tags are 1 to 64 characters long")
