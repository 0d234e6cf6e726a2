"""The typed configuration: defaults, presets, YAML files, dotted overrides and validation."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from dinolab import auto
from dinolab.config import (
    DEFAULT_PRESET,
    Config,
    ConfigError,
    from_dict,
    load_config,
    preset_names,
    to_dict,
    to_yaml,
)


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples (the schema stores tuples)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "model.backbone_kwargs":
            flat.update(_leaves(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_schema_defaults_are_the_reference_recipe() -> None:
    """DINO_SPEC.md: ViT-S/16, 2x224 + 8x96, K = 65536, AdamW 5e-4 per 256, cosine schedules,
    100 epochs: the schema's auto keys resolve to them on ImageNet-1k's 1,281,167 images."""
    config, _ = auto.resolve(Config(), 1_281_167)
    assert config.train.epochs == 100 and config.train.batch_size == 1024
    assert (config.loss.warmup_teacher_temp, config.loss.warmup_teacher_temp_epochs) == (0.04, 0)
    assert config.model.backbone == "vit_small_patch16_224"
    assert (config.data.global_crop_size, config.data.local_crop_size) == (224, 96)
    assert config.data.num_local_crops == 8
    assert config.data.global_crop_scale == (0.4, 1.0)
    assert config.data.local_crop_scale == (0.05, 0.4)
    assert config.data.blur_probs == (1.0, 0.1, 0.5)
    assert config.data.solarize_prob == 0.2
    head = config.model.head
    assert (head.out_dim, head.hidden_dim, head.bottleneck_dim, head.num_layers) == (
        65536, 2048, 256, 3)
    assert head.norm == "none" and head.norm_last_layer is True
    assert config.model.drop_path_rate == 0.1
    assert (config.loss.student_temp, config.loss.teacher_temp) == (0.1, 0.04)
    assert config.loss.center_momentum == 0.9
    optim = config.optim
    assert (optim.lr, optim.min_lr, optim.warmup_epochs) == (5e-4, 1e-6, 10)
    assert (optim.weight_decay, optim.weight_decay_end) == (0.04, 0.4)
    assert (optim.teacher_momentum, optim.teacher_momentum_end) == (0.996, 1.0)
    assert optim.clip_grad == 3.0 and optim.freeze_last_layer_epochs == 1
    assert optim.betas == (0.9, 0.999)
    assert config.eval.knn_k == 20 and config.eval.knn_temperature == 0.07


def test_default_base_is_the_demo_preset_over_the_schema() -> None:
    assert DEFAULT_PRESET in preset_names()
    text = (resources.files("dinolab") / "presets" / f"{DEFAULT_PRESET}.yaml").read_text()
    preset = _leaves(yaml.safe_load(text))
    loaded = _leaves(to_dict(load_config(None)))
    schema = _leaves(to_dict(Config()))
    for key, value in loaded.items():
        assert value == preset.get(key, schema[key]), key
    assert load_config(DEFAULT_PRESET) == load_config(None)


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads_over_the_schema(name: str) -> None:
    text = (resources.files("dinolab") / "presets" / f"{name}.yaml").read_text()
    preset = _leaves(yaml.safe_load(text))
    schema = _leaves(to_dict(Config()))
    assert preset and set(preset) <= set(schema), sorted(set(preset) - set(schema))
    loaded = _leaves(to_dict(load_config(name)))
    assert all(loaded[key] == preset.get(key, schema[key]) for key in loaded)


def test_yaml_file_replaces_the_preset_and_overrides_win(tmp_path: Path) -> None:
    path = _write(tmp_path / "recipe.yaml",
                  "train:\n  epochs: 7\n  batch_size: 64\noptim:\n  lr: 0.001\n"
                  "data:\n  global_crop_scale: [0.3, 1.0]\n")
    config = load_config(path)
    assert (config.train.epochs, config.train.batch_size, config.optim.lr) == (7, 64, 0.001)
    assert tuple(config.data.global_crop_scale) == (0.3, 1.0)
    # keys the file does not set come from the schema, not from the demo preset
    assert config.model.backbone == Config().model.backbone
    assert config.data.source == Config().data.source

    layered = load_config(path, ["train.epochs=9", "optim.min_lr=1e-5"])
    assert (layered.train.epochs, layered.train.batch_size) == (9, 64)
    assert layered.optim.min_lr == 1e-5 and layered.optim.lr == 0.001


def test_overrides_beat_the_preset_and_the_last_one_wins() -> None:
    demo = load_config(None)
    config = load_config(None, ["train.epochs=11", "data.num_local_crops=3",
                                "train.epochs=12"])
    assert demo.train.epochs != 12
    assert config.train.epochs == 12
    assert config.data.num_local_crops == 3
    assert config.model.backbone == demo.model.backbone  # untouched keys keep the preset


def test_documented_public_keys_are_settable(tmp_path: Path) -> None:
    config = load_config(None, [
        "data.source=folder", f"data.root={tmp_path / 'images'}", "model.backbone=resnet18",
        "train.epochs=5", "train.batch_size=32", f"run.dir={tmp_path / 'run'}",
    ])
    assert config.data.source == "folder"
    assert config.data.root == str(tmp_path / "images")
    assert config.model.backbone == "resnet18"
    assert (config.train.epochs, config.train.batch_size) == (5, 32)
    assert config.run.dir == str(tmp_path / "run")
    assert load_config(None, ["data.source=fashion-mnist"]).data.source == "fashion-mnist"


def test_typed_values_from_strings() -> None:
    config = load_config(None, ["train.deterministic=false", "model.patch_size=null",
                                "data.local_crop_scale=[0.1,0.3]", "optim.warmup_epochs=2",
                                "model.backbone_kwargs={depth: 2, qkv_bias: false}"])
    assert config.train.deterministic is False
    assert config.model.patch_size is None
    assert tuple(config.data.local_crop_scale) == (0.1, 0.3)
    assert isinstance(config.optim.warmup_epochs, float)
    assert config.model.backbone_kwargs == {"depth": 2, "qkv_bias": False}


def test_yaml_and_dict_round_trip(tmp_path: Path) -> None:
    config = load_config(None, ["train.epochs=4", "data.global_crop_scale=[0.35,1.0]"])
    assert from_dict(to_dict(config)) == config
    saved = _write(tmp_path / "saved.yaml", to_yaml(config))
    assert load_config(saved) == config


# (preset or YAML, overrides, the key or name the message must contain)
MISTAKES: list[tuple[str | None, list[str], str]] = [
    (None, ["train.epochz=3"], "train.epochz"),
    (None, ["trian.epochs=3"], "trian"),
    (None, ["model.head.widht=3"], "model.head.widht"),
    (None, ["train.epochs=abc"], "train.epochs"),
    (None, ["train.epochs=2.5"], "train.epochs"),
    (None, ["train.deterministic=maybe"], "train.deterministic"),
    (None, ["loss.teacher_temp=-0.04"], "loss.teacher_temp"),
    (None, ["loss.student_temp=0"], "loss.student_temp"),
    (None, ["loss.warmup_teacher_temp=-1"], "loss.warmup_teacher_temp"),
    (None, ["data.local_crop_size=300"], "data.local_crop_size"),
    (None, ["data.global_crop_size=64", "data.local_crop_size=96"], "data.local_crop_size"),
    (None, ["train.epochs=0"], "train.epochs"),
    (None, ["train.batch_size=-8"], "train.batch_size"),
    (None, ["data.global_crop_scale=[0.5,1.5]"], "data.global_crop_scale"),
    (None, ["data.local_crop_scale=[0.4,0.05]"], "data.local_crop_scale"),
    (None, ["data.local_crop_scale=[0,0.4]"], "data.local_crop_scale"),
    (None, ["train.batch_size=10", "train.accumulation_steps=3"], "train.batch_size"),
    (None, ["train.accumulation_steps=0"], "train.accumulation_steps"),
    (None, ["data.source=coco"], "data.source"),
    (None, ["data.decode=gpu"], "data.decode"),
    (None, ["data.augmentation=pil", "data.decode=device"], "data.decode"),
    (None, ["train.device=cpu", "data.decode=device"], "data.decode"),  # auto is pil there
    (None, ["model.head.norm=group"], "model.head.norm"),
    (None, ["model.head.out_dim=0"], "model.head.out_dim"),
    (None, ["optim.min_lr=1.0"], "optim.min_lr"),
    (None, ["optim.lr=inf"], "optim.lr"),
    (None, ["optim.lr=nan"], "optim.lr"),
    (None, ["loss.center_momentum=1.0"], "loss.center_momentum"),
    (None, ["data.flip_prob=1.5"], "data.flip_prob"),
    (None, ["model.drop_path_rate=1.0"], "model.drop_path_rate"),
    (None, ["train.precision=fp8"], "train.precision"),
    (None, ["train.device=tpu"], "train.device"),
    (None, ["train.parallel=deepspeed"], "train.parallel"),
    (None, ["eval.knn_k=0"], "eval.knn_k"),
    (None, ["run.log_every_steps=0"], "run.log_every_steps"),
    (None, ["train.epochs"], "train.epochs"),  # not key=value
    ("no_such_preset", [], "no_such_preset"),
    ("missing/recipe.yaml", [], "missing/recipe.yaml"),
]


@pytest.mark.parametrize(("base", "overrides", "key"), MISTAKES,
                         ids=[" ".join([b or ""] + o).strip() for b, o, _ in MISTAKES])
def test_mistakes_raise_config_error_naming_the_key(base: str | None, overrides: list[str],
                                                    key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(base, overrides)
    message = str(error.value)
    assert key in message
    assert "\n" not in message  # the CLI prints it as one line


@pytest.mark.parametrize(("text", "key"), [
    ("train:\n  epochz: 3\n", "train.epochz"),
    ("train:\n  epochs: many\n", "train.epochs"),
    ("loss:\n  teacher_temp: -1\n", "loss.teacher_temp"),
    ("train: [unclosed\n", "bad.yaml"),
    ("- just\n- a list\n", "bad.yaml"),
])
def test_mistakes_in_a_yaml_file(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(_write(tmp_path / "bad.yaml", text))
    assert key in str(error.value)


@pytest.mark.parametrize(("override", "key"), [
    ("data.global_crop_scale=[0.5]", "data.global_crop_scale"),
    ("data.local_crop_scale=[0.05,0.2,0.4]", "data.local_crop_scale"),
    ("data.blur_probs=[1.0,0.1]", "data.blur_probs"),
    ("data.mean=[0.5]", "data.mean"),
    ("optim.betas=[0.9]", "optim.betas"),
])
def test_wrong_length_tuples_raise_config_error(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_backbone_kwargs_override_replaces_the_preset_value() -> None:
    config = load_config(None, ["model.backbone=resnet18", "model.backbone_kwargs={}"])
    assert config.model.backbone_kwargs == {}


def test_backbone_kwargs_without_a_space_after_the_colon_is_a_config_error() -> None:
    """YAML reads {depth:2} as one key "depth:2" with no value, which timm would ignore."""
    with pytest.raises(ConfigError, match=r"model.backbone_kwargs.*'depth:2'.*space"):
        load_config(None, ["model.backbone_kwargs={depth:2,embed_dim:64}"])
    assert load_config(None, ["model.backbone_kwargs={depth: 2}"]).model.backbone_kwargs == {
        "depth": 2}
