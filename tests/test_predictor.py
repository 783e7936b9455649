"""heads.Predictor (inputs of every kind, batching, class names) and tools/infer.py over folders, globs and videos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import heads
from tools import infer
from tools.engine.det_infer import expand_inputs
from heads.spec import build_from_spec

SPEC = {
    "kind": "mask_rcnn", "backbone": "resnet18", "num_classes": 4, "variant": "v1", "pretrained_backbone": False,
    "backbone_options": {"base_channels": 8}, "fpn_options": {"out_channels": 16},
    "options": {"min_size": [64], "max_size": 128, "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
                "box_detections_per_img": 5, "box_score_thresh": 0.0},
}
NAMES = ["circle", "square", "triangle"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_from_spec(SPEC).eval()


def _rgb(seed: int, size=(48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_predictor_takes_paths_pil_numpy_bgr_and_tensors_alike(model, tmp_path):
    rgb = _rgb(0)
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    predictor = heads.Predictor(model, device="cpu", score_thresh=0.0, class_names=NAMES, batch_size=2)
    inputs = [str(path), Image.fromarray(rgb), rgb, np.ascontiguousarray(rgb[..., ::-1]),
              torch.from_numpy(rgb).permute(2, 0, 1).float() / 255]
    results = [predictor(x, bgr=i == 3) for i, x in enumerate(inputs)]
    batched = predictor([str(path), rgb, rgb])
    assert isinstance(batched, list) and len(batched) == 3
    for result in results + batched:
        torch.testing.assert_close(result["boxes"], results[0]["boxes"], atol=1e-3, rtol=1e-4)
        assert result["labels"].tolist() == results[0]["labels"].tolist()
        assert result["masks"].shape[-2:] == (48, 64)
        assert result["class_names"] == [NAMES[label - 1] for label in result["labels"].tolist()]
    strict = heads.Predictor(model, device="cpu", score_thresh=float(results[0]["scores"].max()) + 1e-6)(rgb)
    assert len(strict["scores"]) == 0 and strict["class_names"] == []


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_predictor_from_a_checkpoint_path_rebuilds_the_model_with_its_names(model, tmp_path, suffix):
    from tools.engine.checkpoint import export_weights

    path = tmp_path / f"model_final{suffix}"
    if suffix == ".safetensors":  # what train_det writes: the spec and names in the header
        export_weights(model, path, metadata={"model_spec": json.dumps(SPEC), "class_names": json.dumps(NAMES)})
    else:
        torch.save({"model": model.state_dict(), "model_spec": SPEC, "class_names": NAMES}, path)
    image = _rgb(3)
    from_path = heads.Predictor(path, device="cpu", score_thresh=0.0)
    expected = heads.Predictor(model, device="cpu", score_thresh=0.0)(image)
    got = from_path(image)
    assert len(expected["labels"]) > 0
    torch.testing.assert_close(got["boxes"], expected["boxes"])
    torch.testing.assert_close(got["masks"], expected["masks"])
    assert got["class_names"] == [NAMES[label - 1] for label in expected["labels"].tolist()]
    assert from_path.info["model_spec"]["kind"] == "mask_rcnn"
    renamed = heads.Predictor(path, device="cpu", score_thresh=0.0, class_names=["a", "b", "c"])(image)
    assert renamed["class_names"] == [["a", "b", "c"][label - 1] for label in expected["labels"].tolist()]
    with pytest.raises(FileNotFoundError):
        heads.Predictor(tmp_path / "missing.pth")


def test_predictor_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="exactly one"):
        heads.Predictor()
    with pytest.raises(ValueError, match="score_thresh"):
        heads.Predictor(model, score_thresh=2.0)
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        heads.Predictor(model, device="cpu")(np.zeros((4, 4), dtype=np.uint8))


def _video(path: Path, frames: int) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_rgb(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_infer_reads_folders_globs_and_videos_and_never_overwrites(model, tmp_path):
    weights = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "model_spec": SPEC, "class_names": NAMES}, weights)
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    Image.fromarray(_rgb(1)).save(photos / "one.png")
    Image.fromarray(_rgb(2)).save(photos / "sub" / "two.jpg")
    (photos / "notes.txt").write_text("not an image")
    _video(tmp_path / "clip.mp4", frames=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "one.png").write_text("an earlier file")
    (out / "two_1.json").write_text("an earlier record")
    (out / "two.png").write_text("another earlier file")
    assert expand_inputs([photos, str(tmp_path / "*.mp4")]) == [photos / "one.png", photos / "sub" / "two.jpg",
                                                                  tmp_path / "clip.mp4"]
    assert infer.main([str(photos), str(tmp_path / "*.mp4"), "--weights", str(weights), "--output-dir", str(out),
                       "--frame-stride", "2", "--score-thresh", "0.0", "--device", "cpu", "--no-progress"]) == 0
    records = json.loads((out / "detections.json").read_text())
    assert [(Path(r["image"]).name, r.get("frame")) for r in records] == [
        ("one.png", None), ("two.jpg", None), ("clip.mp4", 0), ("clip.mp4", 2), ("clip.mp4", 4)]
    assert (out / "one.png").read_text() == "an earlier file" and records[0]["output"] == str(out / "one_1.png")
    # An image's picture and record share the first name free for both; the files there are untouched.
    assert records[0]["json"] == str(out / "one_1.json") and not (out / "one.json").exists()
    assert (records[1]["output"], records[1]["json"]) == (str(out / "two_2.png"), str(out / "two_2.json"))
    assert (out / "two.png").read_text() == "another earlier file"
    assert (out / "two_1.json").read_text() == "an earlier record" and not (out / "two_1.png").exists()
    assert records[2]["output"] == str(out / "clip_f000000.png")
    for record in records:
        assert json.loads(Path(record["json"]).read_text()) == record
        assert Image.open(record["output"]).size[0] >= 64
    results = json.loads((out / "results.json").read_text())
    assert sorted({r["image_id"] for r in results}) == [1, 2, 3, 4, 5]
    assert all("segmentation" in r and len(r["bbox"]) == 4 for r in results)


@pytest.mark.parametrize("argv, message", [
    (["nowhere.png"], "does not exist"),
    (["*.nothing"], "matches no file"),
])
def test_infer_reports_missing_inputs_in_one_line(model, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert infer.main([*argv, "--onnx", "missing.onnx", "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_predictor_reports_an_unreadable_onnx_file(tmp_path):
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="onnxruntime cannot load it"):
        heads.Predictor(onnx=bad)
    with pytest.raises(ValueError, match="does not exist"):
        heads.Predictor(onnx=tmp_path / "missing.onnx")
