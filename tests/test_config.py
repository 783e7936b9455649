"""Typed YAML configs, lr scaling and schedule rescaling (tools.engine.config), and the shipped recipes."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import torch

from tools.engine.cls_config import ClsTrainConfig, build_config, build_model
from tools.engine.config import config_to_dict, load_config, rescale_schedule, save_config, scale_lr

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Demo:
    lr: float = 0.1
    epochs: int = 10
    amp: bool = False
    name: str = "x"
    steps: tuple[int, ...] = (3, 6)
    size: tuple[int, int] = (8, 8)
    tags: list[str] = field(default_factory=list)
    options: dict = field(default_factory=dict)
    clip: float | None = None
    sched: Literal["step", "cosine"] = "step"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_without_file():
    assert load_config(Demo, None) == Demo()


def test_yaml_values_coerced_to_field_types(tmp_path):
    cfg = load_config(
        Demo,
        write(tmp_path / "a.yaml", "lr: 1e-4\nepochs: 20.0\nsteps: [1, 2, 3]\nsize: [4, 5]\nclip: 2\noptions: {a: 1}\n"),
    )
    # PyYAML reads "1e-4" as a string; the float field still gets a float.
    assert cfg.lr == pytest.approx(1e-4) and isinstance(cfg.lr, float)
    assert cfg.epochs == 20 and isinstance(cfg.epochs, int)
    assert cfg.steps == (1, 2, 3)
    assert cfg.size == (4, 5)
    assert cfg.clip == 2.0 and isinstance(cfg.clip, float)
    assert cfg.options == {"a": 1}


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    with pytest.raises(ValueError) as e:
        load_config(Demo, write(tmp_path / "a.yaml", "lr: 0.1\nepoch: 3\n"))
    assert "epoch" in str(e.value) and "'epochs'" in str(e.value) and "'sched'" in str(e.value)


def test_unknown_override_key_rejected():
    with pytest.raises(ValueError, match="valid keys"):
        load_config(Demo, None, {"learning_rate": 0.1})


@pytest.mark.parametrize(
    "text",
    ["epochs: 2.5\n", "amp: 3\n", "name: 4\n", "steps: 5\n", "size: [1, 2, 3]\n", "sched: linear\n", "lr: fast\n"],
)
def test_wrong_types_rejected(tmp_path, text):
    with pytest.raises(ValueError, match="config key"):
        load_config(Demo, write(tmp_path / "a.yaml", text))


def test_literal_error_names_choices(tmp_path):
    with pytest.raises(ValueError, match=r"\['step', 'cosine'\]"):
        load_config(Demo, None, {"sched": "linear"})


def test_overrides_win_and_none_is_ignored(tmp_path):
    cfg = load_config(Demo, write(tmp_path / "a.yaml", "lr: 0.5\nepochs: 7\n"), {"lr": 0.2, "epochs": None})
    assert cfg.lr == 0.2 and cfg.epochs == 7


def test_base_inheritance_is_shallow(tmp_path):
    write(tmp_path / "base.yaml", "lr: 0.5\nepochs: 7\noptions: {a: 1, b: 2}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    child = write(sub / "child.yaml", "_base_: ../base.yaml\nepochs: 9\noptions: {c: 3}\n")
    cfg = load_config(Demo, child)
    assert cfg.lr == 0.5  # from the base
    assert cfg.epochs == 9  # child wins
    assert cfg.options == {"c": 3}  # replaced whole, not merged


def test_two_level_base_rejected(tmp_path):
    write(tmp_path / "a.yaml", "lr: 0.5\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\n")
    child = write(tmp_path / "c.yaml", "_base_: b.yaml\n")
    with pytest.raises(ValueError, match="one level"):
        load_config(Demo, child)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(Demo, tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Demo, write(tmp_path / "a.yaml", "- 1\n- 2\n"))


def test_save_config_round_trip(tmp_path):
    cfg = Demo(lr=0.3, steps=(1, 9), tags=["a"], clip=1.5)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(Demo, tmp_path / "c.yaml") == cfg
    assert config_to_dict(cfg)["steps"] == [1, 9]


def test_scale_lr():
    lr, msg = scale_lr(0.1, 256, 64)
    assert lr == pytest.approx(0.025)
    assert "linear scaling" in msg and "64" in msg and "256" in msg
    assert scale_lr(0.1, 256, 1024)[0] == pytest.approx(0.4)
    assert scale_lr(0.1, 256, 256) == (0.1, None)
    assert scale_lr(0.1, 256, 64, explicit_lr=0.3) == (0.3, None)
    with pytest.raises(ValueError):
        scale_lr(0.1, 0, 64)


def test_rescale_schedule():
    # 30/90 = 1/3 of the run -> 10 of 30; 80/90 * 30 = 26.67 -> 27; warmup 5/90 * 30 = 1.67 -> 2.
    assert rescale_schedule(90, (30, 60, 80), 5, 30) == ((10, 20, 27), 2)
    assert rescale_schedule(1000, (500,), 100, 2000) == ((1000,), 100)  # warmup does not grow with the run
    assert rescale_schedule(90, (30, 60), 0, 1) == ((1, 1), 0)  # never a decay before the first update
    with pytest.raises(ValueError):
        rescale_schedule(0, (1,), 0, 10)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "cls").glob("*.yaml")))
def test_shipped_recipe_builds_and_its_command_trains_at_its_lr(name):
    """Each recipe loads, builds its model, and the command its header documents trains at the recipe's lr (the
    processes times the batch size are its base batch size); a stated eval resize is the one its crop gives."""
    path = REPO / "configs" / "cls" / name
    text = path.read_text()
    cfg, _ = build_config(path)
    with torch.device("meta"):  # built without allocating
        model = build_model(cfg.model, 10, cfg.model_options)
    assert model.fc.out_features == 10
    run = re.search(r"# Run: (?:torchrun --nproc_per_node (\d+)|python) tools/train_cls.py (.*)", text)
    assert int(run[1] or 1) * cfg.batch_size == cfg.base_batch_size
    assert f"--config configs/cls/{name}" in run[2] or "--config" not in run[2]  # its own file, if it names one
    if cfg.sched == "multistep":
        assert 0 < min(cfg.decay_milestones) and max(cfg.decay_milestones) < cfg.epochs
    stated = re.search(r"eval: resize (\d+), center crop (\d+)", text)
    if stated:
        assert (round(cfg.image_size / cfg.crop_pct), cfg.image_size) == (int(stated[1]), int(stated[2]))


def test_epochs_override_moves_milestones():
    cfg, messages = build_config(REPO / "configs" / "cls" / "resnet50_v1.yaml", {"epochs": 30})
    assert cfg.decay_milestones == (10, 20, 27)
    assert any("10, 20, 27" in m for m in messages)
    # Explicit milestones are left alone.
    cfg, _ = build_config(REPO / "configs" / "cls" / "resnet50_v1.yaml", {"epochs": 30, "decay_milestones": [5]})
    assert cfg.decay_milestones == (5,)


# ----------------------------------------------------------------------------- bad configs: one error naming the key


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "a.yaml", "lr: 0.1\nsteps: [1, 2\nepochs: 3\n")
    with pytest.raises(ValueError, match=r"a\.yaml: line 3 column \d+: invalid YAML") as info:
        load_config(Demo, path)
    assert "\n" not in str(info.value)


def test_python_object_tag_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "a.yaml", f"lr: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match=r"a\.yaml: line 1 column 5: .*python/object/apply:os\.system.*refused"):
        load_config(Demo, path)
    assert not marker.exists()


def test_binary_file_and_non_string_keys(tmp_path):
    binary = tmp_path / "a.yaml"
    binary.write_bytes(b"lr: \xff\xfe")
    with pytest.raises(ValueError, match="a.yaml is not UTF-8"):
        load_config(Demo, binary)
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \[1, 'x'\]"):
        load_config(Demo, write(tmp_path / "b.yaml", "1: 2\nx: 3\n"))


@pytest.mark.parametrize("text,key", [
    ("lr: -0.1", "lr"), ("lr: .nan", "lr"), ("lr: .inf", "lr"), ("lr: 1e400", "lr"), ("lr: " + "9" * 400, "lr"),
    ("base_lr: 0", "base_lr"), ("weight_decay: -1e-4", "weight_decay"), ("momentum: 1.0", "momentum"),
    ("momentum: -0.1", "momentum"), ("dist_timeout_s: 0", "dist_timeout_s"), ("dist_timeout_s: .inf", "dist_timeout_s"),
    ("workers: -1", "workers"), ("keep_last: 0", "keep_last"), ("batch_size: 0", "batch_size"),
    ("base_batch_size: 0", "base_batch_size"), ("epochs: 0", "epochs"), ("seed: -1", "seed"),
    ("crop_pct: 1.5", "crop_pct"), ("decay_milestones: [30, -1]", "decay_milestones"),
])
def test_out_of_range_numbers_rejected_at_load_naming_the_key(tmp_path, text, key):
    path = write(tmp_path / "cls.yaml", text + "\n")
    with pytest.raises(ValueError, match=rf"cls\.yaml: config key '{key}' must be") as info:
        load_config(ClsTrainConfig, path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text,key", [("iters: 0", "iters"), ("lr: -1", "lr"), ("weight_decay_norm: -1", "weight_decay_norm"),
                                      ("keep_last: 0", "keep_last"), ("min_sizes: [0]", "min_sizes")])
def test_detection_bounds(tmp_path, text, key):
    from tools.engine.det_config import DetTrainConfig

    with pytest.raises(ValueError, match=rf"det\.yaml: config key '{key}' must be"):
        load_config(DetTrainConfig, write(tmp_path / "det.yaml", text + "\n"))
    keep_null = load_config(DetTrainConfig, write(tmp_path / "ok.yaml", "keep_last: null\nlr: null\n"))
    assert keep_null.keep_last is None and keep_null.lr is None


@pytest.mark.parametrize("text,key", [
    ("backbone_options: {depht: 18}", "depht"), ("fpn_options: {channels: 8}", "channels"),
    ("detector_options: {rpn_head: conv}", "rpn_head"), ("detector_options: {box_nms: 0.5}", "box_nms"),
])
def test_unknown_option_keys_list_the_valid_ones(tmp_path, text, key):
    from tools.engine.det_config import build_config as build_det_config

    path = write(tmp_path / "det.yaml", text + "\n")
    with pytest.raises(ValueError, match=rf"det\.yaml: \w+_options has unknown key\(s\) \['{key}'\]; valid keys: \[") as info:
        build_det_config(path)
    assert "\n" not in str(info.value)


def test_unknown_model_option_and_timm_loading_keys(tmp_path):
    from tools.engine.det_config import build_config as build_det_config

    with pytest.raises(ValueError, match=r"model_options has unknown key\(s\) \['depht'\]; valid keys: .*'deep_stem'"):
        build_config(write(tmp_path / "cls.yaml", "model_options: {depht: 18}\n"))
    with pytest.raises(ValueError, match=r"model_options has unknown key\(s\) \['out_features'\]"):
        build_config(write(tmp_path / "cls.yaml", "model_options: {out_features: [c5]}\n"))
    for key in ("pretrained_cfg_overlay", "checkpoint_path", "pretrained"):
        path = write(tmp_path / "det.yaml", f"backbone: 'timm:resnet18'\nbackbone_options: {{{key}: x}}\n")
        with pytest.raises(ValueError, match=rf"backbone_options: \['{key}'\] may not be set"):
            build_det_config(path)
