"""Every tool on bad input: exit status 2 and one line naming the file or key, never a traceback.

The tools run in-process through their ``main(argv)`` (each case costs the failing step only); one case runs
a tool as a subprocess to show that nothing but the one line reaches stderr.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tools import eval_cls, eval_coco, infer, train_cls, train_det
from tools.reference_models import TINY_CLASSIFIER, TINY_DETECTOR

REPO = Path(__file__).resolve().parent.parent

DET_TINY = {
    **TINY_DETECTOR,
    "min_sizes": [48], "max_size": 64, "batch_size": 2, "lr": 0.01, "warmup_iters": 0, "steps": [],
    "workers": 0, "vis_images": 0, "device": "cpu", "iters": 1, "checkpoint_every": None,
}
CLS_TINY = {**TINY_CLASSIFIER, "image_size": 32, "epochs": 1, "batch_size": 2, "lr": 0.01, "device": "cpu",
            "workers": 0}


@pytest.fixture(scope="module")
def det_yaml(coco_shapes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "det.yaml"
    path.write_text(yaml.safe_dump({**DET_TINY, **coco_shapes}))
    return path


@pytest.fixture(scope="module")
def cls_yaml(shapes_imagefolder, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "cls.yaml"
    path.write_text(yaml.safe_dump({**CLS_TINY, "data": str(shapes_imagefolder)}))
    return path


def _run(tool: str, argv: list[str], capsys) -> str:
    """Run a tool's main in-process; assert exit status 2 and one error line without a traceback; return it."""
    code = {"train_det": train_det, "train_cls": train_cls, "eval_coco": eval_coco, "eval_cls": eval_cls,
            "infer": infer}[tool].main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.out + captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    return errors[0]


# ----------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_weights")
    good = root / "good.pth"
    torch.save({"model": {"w": torch.randn(64, 64)}}, good)
    from safetensors.torch import save_file
    save_file({"w": torch.randn(64, 64)}, str(root / "good.safetensors"))
    files = {
        "empty.pth": b"",
        "truncated.pth": good.read_bytes()[: good.stat().st_size // 2],
        "text.pth": b"this is a text file, not a checkpoint\n",
        "random.pth": bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
        "bad_header.safetensors": struct.pack("<Q", 12) + b'{"w": [1, 2' + (root / "good.safetensors").read_bytes(),
        "truncated.safetensors": (root / "good.safetensors").read_bytes()[:100],
    }
    paths = {}
    for name, data in files.items():
        paths[name] = root / name
        paths[name].write_bytes(data)
    paths["no_weights.pth"] = root / "no_weights.pth"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, paths["no_weights.pth"])
    return paths


CHECKPOINT_TOOLS = {
    "eval_coco": lambda p, d: ("eval_coco", ["--weights", p, "--val-images", d["coco"]["val_images"], "--val-ann",
                                             d["coco"]["val_ann"], "--output-dir", d["out"], "--workers", "0"]),
    "infer": lambda p, d: ("infer", [d["image"], "--weights", p, "--output-dir", d["out"]]),
    "eval_cls": lambda p, d: ("eval_cls", ["--weights", p, "--data", d["imagefolder"], "--workers", "0"]),
    "train_det --eval-only": lambda p, d: ("train_det", ["--config", d["det_yaml"], "--weights", p, "--eval-only",
                                                         "--output-dir", d["out"]]),
    "train_det --weights": lambda p, d: ("train_det", ["--config", d["det_yaml"], "--weights", p,
                                                       "--output-dir", d["out"]]),
    "train_det --pretrained": lambda p, d: ("train_det", ["--config", d["det_yaml"], "--pretrained", p,
                                                          "--output-dir", d["out"]]),
}


@pytest.mark.parametrize("kind", ["empty.pth", "truncated.pth", "text.pth", "random.pth", "bad_header.safetensors",
                                  "truncated.safetensors", "no_weights.pth"])
@pytest.mark.parametrize("tool", list(CHECKPOINT_TOOLS))
def test_corrupt_checkpoint_gives_one_line_naming_it(tool, kind, bad_checkpoints, coco_shapes, shapes_imagefolder,
                                                     det_yaml, tmp_path, capsys):
    path = str(bad_checkpoints[kind])
    data = {"coco": coco_shapes, "imagefolder": str(shapes_imagefolder), "det_yaml": str(det_yaml),
            "out": str(tmp_path / "out"), "image": str(next(Path(coco_shapes["val_images"]).iterdir()))}
    name, argv = CHECKPOINT_TOOLS[tool](path, data)
    line = _run(name, argv, capsys)
    assert path in line
    assert "weights_only=False" not in line


def test_refusal_does_not_relay_advice_to_load_unsafely(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": Payload()}, evil)
    line = _run("eval_cls", ["--weights", str(evil), "--data", str(tmp_path)], capsys)
    assert f"refused to load {evil}" in line and ("GLOBAL posix.system" in line or "GLOBAL os.system" in line)
    assert "weights_only" not in line and "trust" not in line


def test_no_traceback_reaches_stderr_of_a_real_process(bad_checkpoints, coco_shapes, tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/eval_coco.py", "--weights", str(bad_checkpoints["random.pth"]), "--val-images",
         coco_shapes["val_images"], "--val-ann", coco_shapes["val_ann"], "--output-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("error: cannot read checkpoint")
    assert str(bad_checkpoints["random.pth"]) in lines[-1]


# ----------------------------------------------------------------------------- disk full


def test_disk_full_while_checkpointing_is_one_line_naming_the_file(det_yaml, tmp_path, capsys, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    line = _run("train_det", ["--config", str(det_yaml), "--output-dir", str(out)], capsys)
    assert "no space left on device" in line and str(out / "model_0000001.pth") in line
    assert not list(out.glob("*.pth")) and not list(out.glob(".model_*"))  # no half-written file left


def test_half_written_metrics_line_does_not_fail_a_finished_run(tmp_path):
    from tools.engine.logger import MetricLogger
    from tools.engine.plots import plot_curves, read_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')  # a run killed mid-write
    with MetricLogger(tmp_path) as logger:  # the resumed run appends after it
        logger.log(step=3, loss=1.0)
    assert [r["step"] for r in read_metrics(log)] == [1, 3]
    assert plot_curves(log, tmp_path / "curves.png", ["loss"]).is_file()


# ----------------------------------------------------------------------------- unreadable images


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_training_image_named_by_train_det(workers, coco_shapes, tmp_path, capsys):
    images = Path(shutil.copytree(coco_shapes["train_images"], tmp_path / "train"))
    for path in images.iterdir():
        path.write_bytes(b"")  # every one, so that the first batch meets one
    config = tmp_path / "det.yaml"
    config.write_text(yaml.safe_dump({**DET_TINY, **coco_shapes, "train_images": str(images), "workers": workers}))
    line = _run("train_det", ["--config", str(config), "--output-dir", str(tmp_path / "out")], capsys)
    assert "cannot read image" in line and str(images) in line


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_training_image_named_by_train_cls(workers, shapes_imagefolder, cls_yaml, tmp_path, capsys):
    data = Path(shutil.copytree(shapes_imagefolder, tmp_path / "data"))
    for path in (data / "train").rglob("*.*"):
        path.write_text("not an image")
    line = _run("train_cls", ["--config", str(cls_yaml), "--data", str(data), "--workers", str(workers),
                              "--output-dir", str(tmp_path / "out")], capsys)
    assert "cannot read image" in line and str(data / "train") in line and "--skip-bad-images" in line


def test_skipping_never_leaves_a_training_batch_of_one():
    from tools.engine.cls_data import collate_skipping_none

    sample = (torch.zeros(3, 4, 4), 1)
    assert collate_skipping_none([None, sample]) == (None, None, 2)  # BatchNorm would fail on one image
    images, targets, skipped = collate_skipping_none([None, sample, sample])
    assert images.shape[0] == 2 and skipped == 1
    images, _, skipped = collate_skipping_none([sample])  # a batch of one that lost nothing is left alone
    assert images.shape[0] == 1 and skipped == 0
    images, _, skipped = collate_skipping_none([None, sample], min_images=1)  # evaluation keeps it
    assert images.shape[0] == 1 and skipped == 1


def test_float_and_32_bit_images_read_as_their_8_bit_picture(tmp_path):
    import numpy as np
    from PIL import Image

    from tools.engine.images import read_rgb_array, read_rgb_image

    gray = np.arange(40 * 30, dtype=np.uint8).reshape(30, 40)
    Image.fromarray(gray / np.float32(255)).save(tmp_path / "unit.tif")
    Image.fromarray(gray.astype(np.int32) * 257).save(tmp_path / "wide.tif")
    for name in ("unit.tif", "wide.tif"):
        assert np.array_equal(np.asarray(read_rgb_image(tmp_path / name))[:, :, 1], gray)
        assert np.allclose(read_rgb_array(tmp_path / name)[:, :, 0], gray / 255, atol=1e-6)


# ----------------------------------------------------------------------------- infer never overwrites


@pytest.fixture(scope="module")
def det_weights(coco_shapes, tmp_path_factory) -> Path:
    """An untrained tiny detector with its model spec, as the tools write it."""
    from tools.engine.checkpoint import export_weights
    from tools.engine.config import load_config
    from tools.engine.det_config import DetTrainConfig, model_spec
    from heads.spec import build_from_spec

    spec = model_spec(load_config(DetTrainConfig, None, DET_TINY), num_classes=4)
    return export_weights(build_from_spec(spec), tmp_path_factory.mktemp("w") / "det.safetensors",
                          metadata={"model_spec": json.dumps(spec)})


def test_infer_never_writes_over_an_input_or_an_existing_file(coco_shapes, det_weights, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    source = next(Path(coco_shapes["val_images"]).iterdir())
    inside = out / "photo.png"  # an input inside --output-dir, named as its output would be
    inside.write_bytes(source.read_bytes())  # a JPEG named .png: the content decides
    elsewhere = tmp_path / "photo.jpg"  # same stem, other folder
    elsewhere.write_bytes(source.read_bytes())
    old_json = out / "detections.json"
    old_json.write_text("an earlier run's results\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    argv = [str(inside), str(elsewhere), "--weights", str(det_weights), "--output-dir", str(out),
            "--score-thresh", "0"]
    assert infer.main(argv) == 0
    assert infer.main(argv) == 0  # a second run next to the first
    capsys.readouterr()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name in before} == before  # nothing replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["photo.png", "photo_1.png", "photo_2.png", "photo_3.png", "photo_4.png",  # the input, then 2 runs x 2 images
         "photo_1.json", "photo_2.json", "photo_3.json", "photo_4.json",  # one JSON per image and run, named as its PNG
         "detections.json", "detections_1.json", "detections_2.json", "results.json", "results_1.json"])
    records = json.loads((out / "detections_1.json").read_text())
    assert [r["output"] for r in records] == [str(out / "photo_1.png"), str(out / "photo_2.png")]
    assert [r["json"] for r in records] == [str(out / "photo_1.json"), str(out / "photo_2.json")]


# ----------------------------------------------------------------------------- configs and stored model specs


@pytest.mark.parametrize("text,named", [
    ("iters: 1\nsteps: [1, 2\nlr: 0.1\n", "line 3"),
    ("lr: !!python/object/apply:os.getcwd []\n", "line 1"),
    ("lr: -1\n", "'lr'"),
    ("momentum: 1.5\n", "'momentum'"),
    ("dist_timeout_s: .nan\n", "'dist_timeout_s'"),
    ("backbone_options: {depht: 18}\n", "'depht'"),
])
def test_bad_config_is_one_line_naming_file_and_key(text, named, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    for tool in ("train_det", "train_cls"):
        if tool == "train_cls" and "backbone_options" in text:
            continue
        line = _run(tool, ["--config", str(path), "--output-dir", str(tmp_path / "out")], capsys)
        assert str(path) in line and named in line


@pytest.mark.parametrize("change,named", [
    ({"backbone": "timm:resnet18", "backbone_options": {"pretrained_cfg_overlay": {"file": "/etc/hostname"}}},
     "'pretrained_cfg_overlay'"),
    ({"backbone": "timm:resnet18", "backbone_options": {"checkpoint_path": "/etc/hostname"}}, "'checkpoint_path'"),
    ({"options": {"min_size": 48, "rpn_head": "conv"}}, "'rpn_head'"),
    ({"fpn_options": {"out_channels": "many"}}, "fpn_options.out_channels"),
    ({"num_classes": -3}, "num_classes"),
    ({"extra": 1}, "'extra'"),
])
def test_stored_model_spec_checked_like_a_config(change, named, det_weights, coco_shapes, tmp_path, capsys):
    from safetensors import safe_open
    from tools.engine.checkpoint import export_weights, load_checkpoint

    with safe_open(str(det_weights), framework="pt") as f:
        metadata = f.metadata()
    spec = {**json.loads(metadata["model_spec"]), **change}
    forged = export_weights(load_checkpoint(det_weights), tmp_path / "forged.safetensors",
                            metadata={**metadata, "model_spec": json.dumps(spec)})
    for tool, argv in (("eval_coco", ["--val-images", coco_shapes["val_images"], "--val-ann", coco_shapes["val_ann"],
                                      "--output-dir", str(tmp_path / "out"), "--workers", "0"]),
                       ("infer", [coco_shapes["val_images"] + "/000000.jpg", "--output-dir", str(tmp_path / "out")])):
        line = _run(tool, ["--weights", str(forged), *argv], capsys)
        assert str(forged) in line and named in line


def test_stored_classifier_settings_checked_like_a_config(shapes_imagefolder, tmp_path, capsys):
    from tools.engine.cls_config import build_model

    model = build_model("resnet18", 2, {"base_channels": 8})
    base = {"model": model.state_dict(), "model_name": "resnet18", "model_options": {"base_channels": 8},
            "class_names": ["circle", "rectangle"]}
    for change, named in (({"model_options": {"base_channels": 8, "depht": 3}}, "'depht'"),
                          ({"crop_pct": 5.0}, "'crop_pct'"), ({"image_size": -1}, "'image_size'"),
                          ({"model_name": "resnet18; rm"}, "unknown model")):
        path = tmp_path / "forged.pth"
        torch.save({**base, **change}, path)
        line = _run("eval_cls", ["--weights", str(path), "--data", str(shapes_imagefolder), "--workers", "0"], capsys)
        assert str(path) in line and named in line


@pytest.mark.parametrize("segmentation,named", [
    ({"size": [64, 64], "counts": [0, 4096]}, "compressed RLE"),  # was a TypeError from pycocotools
    ({"size": [10, 10], "counts": "PPP"}, "not a valid RLE of image id"),  # was scored as it was
    ({"size": [10**9, 10**9], "counts": "0"}, "not a valid RLE of image id"),
    ({"size": [64, 64], "counts": "\x7f\x7f"}, "not a valid RLE of image id"),
])
def test_results_file_with_bad_masks_is_one_line(segmentation, named, coco_shapes, tmp_path, capsys):
    ann = json.loads(Path(coco_shapes["val_ann"]).read_text())["annotations"][0]
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": ann["image_id"], "category_id": ann["category_id"],
                                    "bbox": ann["bbox"], "score": 0.9, "segmentation": segmentation}]))
    line = _run("eval_coco", ["--results", str(results), "--val-ann", coco_shapes["val_ann"], "--output-dir",
                              str(tmp_path / "out")], capsys)
    assert str(results) in line and named in line
