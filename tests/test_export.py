"""Export to ONNX and torch.export (heads.export, tools/export.py): parity with eager at new image sizes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import backbones
from heads.export import _onnx_grouped_nms, export, trace
from heads.postprocess import grouped_nms
import heads
from tools import export as export_tool
from tools.engine.deploy import match_detections
from heads.spec import build_from_spec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# A tiny Mask R-CNN whose images resize to 128..256 px (every pyramid level keeps >= 2 cells).
SPEC = {
    "kind": "mask_rcnn", "backbone": "resnet18", "num_classes": 5, "variant": "v1", "pretrained_backbone": False,
    "backbone_options": {"base_channels": 8}, "fpn_options": {"out_channels": 16},
    "options": {"min_size": [128], "max_size": 256, "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50,
                "box_detections_per_img": 20, "box_score_thresh": 0.0},
}
# Sizes other than the traced example's (320 x 416), both orientations and an odd aspect ratio.
SIZES = [(50, 90), (97, 41), (200, 150)]


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, h, w, generator=g) for h, w in SIZES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model, with the score threshold set so that one image (put first) has no detection, traced once
    and written as ONNX and pt2."""
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    with torch.no_grad():
        scored = sorted((float(model([image])[0]["scores"].max()), i, image) for i, image in enumerate(_images()))
    # Random weights: the gap between the two lowest best scores is checked, not assumed.
    assert scored[1][0] - scored[0][0] > 2e-3, scored
    model.roi_heads.score_thresh = (scored[0][0] + scored[1][0]) / 2
    images = [image for _, _, image in scored]
    folder = tmp_path_factory.mktemp("export")
    traced = trace(model)
    onnx_path = export(traced, folder / "model.onnx", "onnx", optimize=False)
    pt2_path = export(traced, folder / "model.pt2", "pt2")
    return model, onnx_path, pt2_path, images


def _check_parity(reference: list[dict], others: list[dict], what: str) -> None:
    matched = total = 0
    for i, (ref, other) in enumerate(zip(reference, others)):
        assert len(other["scores"]) == len(ref["scores"]), f"{what}, image {i}: detection count"
        m, n = match_detections(ref, other)
        matched, total = matched + m, total + n
    assert matched >= 0.99 * total, f"{what}: {matched}/{total} detections reproduced"


def test_detector_onnx_and_pt2_reproduce_eager_at_new_sizes(exported):
    model, onnx_path, pt2_path, images = exported
    with torch.no_grad():
        eager = [model([image])[0] for image in images]
    assert len(eager[0]["scores"]) == 0 and all(len(d["scores"]) > 0 for d in eager[1:])
    assert all(d["masks"].shape[-2:] == image.shape[-2:] for d, image in zip(eager, images))

    onnx.checker.check_model(str(onnx_path), full_check=True)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    names = [o.name for o in session.get_outputs()]
    assert names == ["boxes", "labels", "scores", "masks"]
    from_onnx = [dict(zip(names, session.run(None, {"image": image.numpy()}))) for image in images]
    assert from_onnx[1]["labels"].dtype == np.int64
    _check_parity(eager, from_onnx, "onnxruntime")

    program = torch.export.load(str(pt2_path)).module()
    with torch.no_grad():
        from_pt2 = [program(image) for image in images]
    _check_parity(eager, from_pt2, "torch.export")
    for ref, other in zip(eager, from_pt2):
        for key in ref:
            torch.testing.assert_close(other[key], ref[key], atol=1e-4, rtol=1e-4)


def test_grouped_nms_op_in_onnx_keeps_groups_apart_and_orders_ties_by_index(tmp_path):
    """The ONNX NonMaxSuppression-per-group translation against the eager op, ties and empty input included."""

    class Nms(torch.nn.Module):
        def forward(self, boxes, scores, groups):
            return torch.ops.resdet.grouped_nms(boxes, scores, groups, 0.5, 3)

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 9, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.8, 0.8, 0.95])
    groups = torch.tensor([0, 0, 1, 2, 1])
    k = torch.export.Dim("k", min=0)
    program = torch.export.export(Nms(), (boxes, scores, groups), dynamic_shapes=({0: k}, {0: k}, {0: k}))
    path = tmp_path / "nms.onnx"
    torch.onnx.export(program, f=str(path), dynamo=True, optimize=False, input_names=["boxes", "scores", "groups"],
                      custom_translation_table={torch.ops.resdet.grouped_nms.default: _onnx_grouped_nms})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (5, 0):
        feed = {"boxes": boxes[:n].numpy(), "scores": scores[:n].numpy(), "groups": groups[:n].numpy()}
        expected = grouped_nms(boxes[:n], scores[:n], groups[:n], 0.5)
        assert session.run(None, feed)[0].tolist() == expected.tolist()
    assert expected.numel() == 0 and session.run(None, feed)[0].shape == (0,)


def test_classifier_and_features_export_with_dynamic_batch_and_size(tmp_path):
    torch.manual_seed(0)
    classifier = backbones.resnet18(base_channels=8, num_classes=7).eval()
    fpn = backbones.FPN(backbones.resnet18(base_channels=8, out_features=("c2", "c3", "c4", "c5")),
                        out_channels=16).eval()
    for model, name in ((classifier, "cls"), (fpn, "fpn")):
        traced = trace(model)
        onnx_path = export(traced, tmp_path / f"{name}.onnx", optimize=False)
        program = torch.export.load(str(export(traced, tmp_path / f"{name}.pt2", "pt2"))).module()
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        assert outputs == (["logits"] if name == "cls" else ["p2", "p3", "p4", "p5", "p6"])
        for shape in ((1, 3, 97, 130), (3, 3, 70, 66)):
            x = torch.rand(shape)
            with torch.no_grad():
                eager = model(x)
            eager = {"logits": eager} if name == "cls" else dict(eager)
            from_onnx = dict(zip(outputs, session.run(None, {"images": x.numpy()})))
            with torch.no_grad():
                from_pt2 = program(x)
            from_pt2 = {"logits": from_pt2} if name == "cls" else from_pt2
            for key, value in eager.items():
                scale = float(value.abs().max())
                assert float((torch.from_numpy(from_onnx[key]) - value).abs().max()) <= 1e-4 * scale, (name, key)
                assert float((from_pt2[key] - value).abs().max()) <= 1e-4 * scale, (name, key)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    spec = {**SPEC, "kind": "faster_rcnn"}
    path = tmp_path / "model_final.pth"
    torch.save({"model": build_from_spec(spec).state_dict(), "model_spec": spec, "class_names": list("abcd")}, path)
    return path


@pytest.mark.parametrize("argv, message", [
    (["--detector", "retinanet"], "detector must be one of"),
    (["--num-classes", "7"], "another number of classes"),
    (["--format", "tflite"], "format must be one of"),
    (["--model", "resnet51"], "resnet51"),
])
def test_export_tool_reports_bad_input_in_one_line(checkpoint, tmp_path, capsys, argv, message):
    base = {"--weights": str(checkpoint), "--format": "onnx", "--output": str(tmp_path / "out.onnx")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert export_tool.main([item for pair in base.items() for item in pair]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out.onnx").exists()


def test_export_tool_refuses_unreadable_checkpoint_and_existing_output(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    existing = tmp_path / "taken.onnx"
    existing.write_text("keep me")
    for weights, output in ((bad, tmp_path / "a.onnx"), (tmp_path / "missing.pth", tmp_path / "b.onnx"),
                            (checkpoint, existing)):
        assert export_tool.main(["--weights", str(weights), "--format", "pt2", "--output", str(output)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert existing.read_text() == "keep me"


@pytest.mark.slow  # a second detector trace (about 30 s on 2 cores)
def test_export_tool_writes_a_pt2_detector(checkpoint, tmp_path, capsys):
    output = tmp_path / "model.pt2"
    assert export_tool.main(["--weights", str(checkpoint), "--format", "pt2", "--output", str(output)]) == 0
    assert "faster_rcnn" in capsys.readouterr().out
    result = torch.export.load(str(output)).module()(torch.rand(3, 77, 101))
    assert set(result) == {"boxes", "labels", "scores"} and result["boxes"].shape[1] == 4


@pytest.mark.slow  # R50-FPN: export and three runs of three images (about a minute on 2 cores)
def test_r50_mask_rcnn_onnx_and_pt2_reproduce_eager(tmp_path):
    torch.manual_seed(0)
    # Resized to a shorter side of 320 (not 800), as fast as the test needs: every image is still resized.
    model = build_from_spec({"kind": "mask_rcnn", "backbone": "resnet50", "num_classes": 91,
                             "options": {"box_score_thresh": 0.0, "box_detections_per_img": 50, "min_size": 320,
                                         "max_size": 544}}).eval()
    # Random mask logits sit near 0, at the 0.5 cut, where float rounding flips whole masks: sharpened. What still
    # differs (about 1 detection in 100): a box within 1e-3 px of an FPN level boundary pools from the other level,
    # whose random features have nothing in common with its neighbour's.
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(30)
    traced = trace(model, torch.rand(3, 480, 640))
    onnx_path, pt2_path = export(traced, tmp_path / "r50.onnx"), export(traced, tmp_path / "r50.pt2", "pt2")
    images = [torch.rand(3, 300, 410), torch.rand(3, 420, 260), torch.rand(3, 517, 333)]
    with torch.no_grad():
        eager = [model([image])[0] for image in images]
        from_pt2 = [torch.export.load(str(pt2_path)).module()(image) for image in images]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    from_onnx = [dict(zip(names, session.run(None, {"image": image.numpy()}))) for image in images]
    assert all(len(d["scores"]) == 50 for d in eager)
    assert all(float((d["masks"] > 0.5).float().mean()) > 0 for d in eager)
    _check_parity(eager, from_onnx, "onnxruntime")
    _check_parity(eager, from_pt2, "torch.export")


def test_predictor_and_infer_run_the_onnx_file_as_eager(exported, tmp_path):
    model, onnx_path, _, images = exported
    thresh = model.roi_heads.score_thresh
    # One image per forward: a batch pads its images to a common size, which moves detections slightly.
    eager = heads.Predictor(model, device="cpu", score_thresh=thresh, class_names=list("abcd"), batch_size=1)(images)
    from_onnx = heads.Predictor(onnx=onnx_path, score_thresh=thresh, class_names=list("abcd"))(images)
    _check_parity(eager, from_onnx, "Predictor(onnx=...)")
    assert [d["class_names"] for d in from_onnx] == [d["class_names"] for d in eager]

    from PIL import Image
    from tools import infer

    Image.fromarray((images[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "x.png")
    assert infer.main([str(tmp_path / "x.png"), "--onnx", str(onnx_path), "--output-dir", str(tmp_path / "out"),
                       "--score-thresh", "0.0", "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "detections.json").read_text())[0]
    assert len(record["detections"]) > 0 and record["detections"][0]["category_name"].isdigit()
