"""Detectron/detectron2 ``.pkl`` files: safe unpickling, Caffe2 ResNet names, and features equal to detectron2's.

The reference features in ``tests/data/detectron`` come from detectron2's own ``DetectionCheckpointer`` and
``build_resnet_backbone`` (``tools/make_detectron_reference.py``); the weights are rebuilt here from the same seed.
"""
import json
import logging
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import backbones as B
import heads
from backbones.detectron import caffe2_to_resnet_name, is_caffe2_state, resnet_to_caffe2_name
from backbones.weights import UnsafeCheckpointError, compare_state_dicts, read_checkpoint, read_file
from tools.make_detectron_reference import (
    CASES,
    DETECTOR_CASES,
    Case,
    Python2Pickler,
    blobs_digest,
    caffe2_resnet_blobs,
    detectron2_rcnn_state,
    fixture_arrays,
    reference_images,
    write_detectron2_pkl,
    write_pickle,
)

DATA = os.path.join(os.path.dirname(__file__), "data", "detectron")
FEATURES = ("c2", "c3", "c4", "c5")
# A narrow R-50 (stem 16): the same names and layout as MSRA's R-50.pkl at 1/16 of the weights.
SMALL = Case(50, 16, 1, 16, True, seed=7, layout="flat", protocol=4)
# Wide enough for GroupNorm's 32 groups.
SMALL_GN = Case(50, 32, 1, 32, False, seed=3, layout="flat", protocol=4)


def _resnet(case: Case, **kwargs) -> B.ResNet:
    options = dict(out_features=FEATURES, norm="FrozenBN", **case.resnet_kwargs())
    options.update(kwargs)
    return B.ResNet(case.depth, **options)


def _write(tmp_path, blobs, name="R-50.pkl", protocol=4):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(blobs, f, protocol=protocol)
    return path


@pytest.fixture(scope="module")
def small_blobs():
    return caffe2_resnet_blobs(SMALL)


@pytest.fixture(scope="module")
def gn_blobs():
    return {b.replace("_bn_", "_gn_"): v for b, v in caffe2_resnet_blobs(SMALL_GN).items()}


# -- safe unpickling ---------------------------------------------------------------------------------------------


def _assert_fixture(loaded):
    expected = fixture_arrays()
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        if isinstance(value, np.ndarray):
            assert isinstance(loaded[name], torch.Tensor), name
            assert loaded[name].dtype == torch.from_numpy(value.astype(value.dtype.newbyteorder("="))).dtype
            np.testing.assert_array_equal(loaded[name].numpy(), value, err_msg=name)
    assert loaded["scalar"] == 0.25 and isinstance(loaded["scalar"], float)
    assert loaded["__author__"] == "resdet fixture"


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(DATA) if f.startswith("arrays-")))
def test_numpy_pickles_of_numpy_1_and_2_read_as_tensors(name):
    """Written by numpy 1.26 (numpy.core) and numpy 2 (numpy._core) with protocols 2, 4 and 5 (_frombuffer)."""
    _assert_fixture(read_file(os.path.join(DATA, name)))


def test_python2_pickle_reads(tmp_path):
    """Detectron's files are Python 2 pickles: arrays' bytes in Python 2 strings, read with encoding="latin1"."""
    path = tmp_path / "py2.pkl"
    with open(path, "wb") as f:
        Python2Pickler(f).dump(fixture_arrays())
    assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
    _assert_fixture(read_file(path))


def test_detectron2_model_zoo_layout_unwraps_model(tmp_path):
    state = {"stem.conv1.weight": np.ones((2, 3, 1, 1), np.float32), "res2.0.conv1.norm.bias": np.zeros(2)}
    path = _write(tmp_path, {"model": state, "__author__": "Detectron2 Model Zoo", "matching_heuristics": True})
    loaded = read_checkpoint(path)
    assert set(loaded) == set(state) and all(isinstance(v, torch.Tensor) for v in loaded.values())


def test_pkl_written_by_torch_save_reads_like_pth(tmp_path):
    model = B.resnet18().eval()
    for zip_format in (True, False):
        path = tmp_path / f"torch-{zip_format}.pkl"
        torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
        fresh = B.resnet18()
        B.load_weights(fresh, path)
        assert torch.equal(fresh.layer4[1].conv2.weight, model.layer4[1].conv2.weight)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Open:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [_System, _Open])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pkl_is_refused_without_running(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    blobs = {"conv1_w": np.zeros((1, 3, 7, 7), np.float32), "res2_0_branch2a_w": payload(marker)}
    path = _write(tmp_path, {"blobs": blobs}, "R-50.pkl", protocol)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_file(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    refused = payload(marker).__reduce__()[0]
    assert f"({refused.__module__}.{refused.__name__})" in message  # the refused global: posix.system, io.open
    with pytest.raises(ValueError, match="refused to load"):
        B.load_weights(B.resnet50(), path)
    assert not marker.exists()
    # The payload is live: an unrestricted unpickler would have run it.
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_codecs_encode_beyond_latin1_bytes_is_refused(tmp_path):
    path = tmp_path / "codec.pkl"
    # _codecs.encode("x", "rot13"): allowed as a global (protocol 2 bytes), but only for latin-1.
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        read_file(path)


def test_truncated_pkl_is_named(tmp_path, small_blobs):
    path = _write(tmp_path, small_blobs)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path}"):
        read_file(path)


# -- one key report for backbones and detectors -------------------------------------------------------------------


def test_key_report_counters_are_optional_on_both_sides():
    expected = {"a.weight": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0), "b.weight": torch.zeros(3)}
    state = {"a.weight": torch.zeros(3), "extra": torch.zeros(1), "other.num_batches_tracked": torch.tensor(1)}
    report = compare_state_dicts(expected, state)
    assert report.missing == ["b.weight"] and report.unexpected == ["extra"]
    assert report.wrong_shape == [("a.weight", (3,), (2,))]


def test_backbone_takes_a_frozen_bn_checkpoint_without_counters():
    frozen = B.resnet18(norm="FrozenBN")
    result = B.load_weights(B.resnet18(), frozen.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []


# -- Caffe2 ResNets -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_caffe2_weights_give_detectron2s_features(tmp_path, name):
    """Same features as detectron2's ResNet after its own Caffe2 conversion: float64 to rounding, float32 to 1e-4."""
    case = CASES[name]
    with safe_open(os.path.join(DATA, f"{name}.safetensors"), "pt") as f:
        reference = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    assert json.loads(metadata["case"]) == case._asdict()
    blobs = caffe2_resnet_blobs(case)
    assert blobs_digest(blobs) == metadata["blobs_sha256"], "the generator no longer makes the reference's weights"
    path = tmp_path / f"{name}.pkl"
    write_pickle(case, blobs, path)
    # Left out: Detectron's zero conv biases (detectron2 has no place for them either) and the unbuilt classifier.
    left_out = {b for b in blobs if b.endswith("_b") and "_bn_" not in b} | {"fc1000_w"}
    del blobs

    model = _resnet(case).eval()
    result = B.load_weights(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert set(result.skipped_keys) == left_out
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        with torch.no_grad():
            features = model.to(dtype)(reference["input"].to(dtype))
        for ours, theirs in zip(FEATURES, ("res2", "res3", "res4", "res5")):
            scale = reference[theirs].abs().max().item()
            torch.testing.assert_close(
                features[ours].double(), reference[theirs], rtol=tolerance, atol=tolerance * scale,
                msg=lambda text: f"{ours} in {dtype}: {text}",
            )


def test_every_blob_lands_where_detectron2_puts_it(tmp_path, small_blobs):
    model = _resnet(SMALL, out_features=None)
    result = B.load_weights(model, _write(tmp_path, small_blobs))
    assert result.missing_keys == [] and result.unexpected_keys == []
    state = model.state_dict()
    pairs = {
        "conv1.weight": "conv1_w",
        "bn1.weight": "res_conv1_bn_s",
        "layer1.0.downsample.0.weight": "res2_0_branch1_w",
        "layer1.0.downsample.1.bias": "res2_0_branch1_bn_b",
        "layer2.3.conv2.weight": "res3_3_branch2b_w",
        "layer3.5.bn3.weight": "res4_5_branch2c_bn_s",
        "layer4.2.bn1.bias": "res5_2_branch2a_bn_b",
        "fc.weight": "fc1000_w",
        "fc.bias": "fc1000_b",
    }
    for key, blob in pairs.items():
        assert torch.equal(state[key], torch.from_numpy(small_blobs[blob])), key
    # Affine-only norms: statistics as detectron2's FrozenBatchNorm2d fills them (running_var 1, not 1 - eps).
    norms = [m for m in model.modules() if hasattr(m, "running_var")]
    assert norms and all(torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert all(not m.running_mean.any() for m in norms)


def test_names_map_both_ways():
    models = [
        _resnet(SMALL, out_features=None),
        B.ResNet(101, groups=32, width_per_group=8, base_channels=16),
        B.resnet18(),
        B.ResNet(50, norm="GN", base_channels=32),
    ]
    for model in models:
        norm = "gn" if isinstance(model.bn1, nn.GroupNorm) else "bn"
        for key in model.state_dict():
            if not key.endswith("num_batches_tracked"):
                blob = resnet_to_caffe2_name(key, norm)
                assert blob is not None and caffe2_to_resnet_name(blob) == key, key
    assert caffe2_to_resnet_name("res3_1_branch1_w") == "layer2.1.downsample.0.weight"
    assert caffe2_to_resnet_name("pred_w") == "fc.weight"
    assert caffe2_to_resnet_name("res4_0_branch2a_bn_riv") == "layer3.0.bn1.running_var"
    assert not is_caffe2_state(B.resnet18().state_dict())


def test_missing_blobs_are_listed_by_their_caffe2_names(tmp_path, small_blobs):
    blobs = {k: v for k, v in small_blobs.items() if k not in ("res3_1_branch2b_bn_s", "res4_0_branch1_w")}
    path = _write(tmp_path, blobs)
    with pytest.raises(ValueError) as info:
        B.load_weights(_resnet(SMALL), path)
    message = str(info.value)
    assert "missing keys: " in message and "\n" not in message
    assert "res3_1_branch2b_bn_s (layer2.1.bn2.weight)" in message
    assert "res4_0_branch1_w (layer3.0.downsample.0.weight)" in message
    assert "running" not in message  # the statistics are filled in, not reported
    result = B.load_weights(_resnet(SMALL), path, strict=False)
    assert result.missing_keys == ["layer2.1.bn2.weight", "layer3.0.downsample.0.weight"]


def test_unexpected_blobs_and_wrong_shapes_keep_their_caffe2_names(tmp_path, small_blobs):
    extra = dict(small_blobs, fpn_inner_res5_2_sum_w=np.zeros((256, 2048, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"unexpected keys: fpn_inner_res5_2_sum_w"):
        B.load_weights(_resnet(SMALL), _write(tmp_path, extra))
    result = B.load_weights(_resnet(SMALL), _write(tmp_path, extra), strict=False)
    assert result.unexpected_keys == ["fpn_inner_res5_2_sum_w"]
    with pytest.raises(ValueError, match=r"res2_0_branch2b_w \(layer1\.0\.conv2\.weight\): checkpoint"):
        B.load_weights(_resnet(SMALL, groups=2), _write(tmp_path, small_blobs))


def test_momentum_blobs_are_dropped(tmp_path, small_blobs):
    blobs = dict(small_blobs, conv1_w_momentum=np.zeros_like(small_blobs["conv1_w"]))
    result = B.load_weights(_resnet(SMALL), _write(tmp_path, blobs))
    assert result.unexpected_keys == [] and "conv1_w_momentum" not in result.skipped_keys


def test_feature_extractor_skips_unbuilt_stages_by_blob_name(tmp_path, small_blobs):
    result = B.load_weights(_resnet(SMALL, out_features=("c2", "c3")), _write(tmp_path, small_blobs))
    assert "res4_0_branch2a_w" in result.skipped_keys and "fc1000_w" in result.skipped_keys
    assert not any(k.startswith("layer") for k in result.skipped_keys)


def test_fpn_loads_caffe2_weights_into_its_body(tmp_path, small_blobs):
    fpn = B.FPN(_resnet(SMALL), out_channels=32)
    B.load_weights(fpn, _write(tmp_path, small_blobs))
    assert torch.equal(fpn.body.layer1[0].conv1.weight, torch.from_numpy(small_blobs["res2_0_branch2a_w"]))


def test_nonzero_conv_bias_is_left_out_with_a_warning(tmp_path, small_blobs, caplog):
    blobs = dict(small_blobs, conv1_b=np.full_like(small_blobs["conv1_b"], 0.5))
    with caplog.at_level(logging.WARNING, logger="backbones.detectron"):
        result = B.load_weights(_resnet(SMALL), _write(tmp_path, blobs))
    assert "conv1_b" in caplog.text and "conv1_b" in result.skipped_keys
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="backbones.detectron"):
        B.load_weights(_resnet(SMALL), _write(tmp_path, small_blobs))  # Detectron's zero biases: nothing to say
    assert not caplog.records


def test_unfolded_bn_blobs_load_their_statistics(tmp_path, small_blobs):
    """detectron2's own copies keep BN unfolded: gamma/beta/running_mean/running_var, or rm/riv."""
    rng = np.random.RandomState(0)
    for names in (("gamma", "beta", "running_mean", "running_var"), ("s", "b", "rm", "riv")):
        blobs = {}
        for blob, value in small_blobs.items():
            if blob.endswith("_bn_s"):
                stem = blob[: -len("_s")]
                blobs[f"{stem}_{names[0]}"] = value
                blobs[f"{stem}_{names[2]}"] = rng.uniform(-1, 1, value.shape).astype(np.float32)
                blobs[f"{stem}_{names[3]}"] = rng.uniform(0.5, 2, value.shape).astype(np.float32)
            elif blob.endswith("_bn_b"):
                blobs[f"{blob[: -len('_b')]}_{names[1]}"] = value
            else:
                blobs[blob] = value
        model = _resnet(SMALL)
        B.load_weights(model, _write(tmp_path, blobs))
        bn = model.layer3[2].bn2
        assert torch.equal(bn.running_var, torch.from_numpy(blobs[f"res4_2_branch2b_bn_{names[3]}"]))
        assert torch.equal(bn.running_mean, torch.from_numpy(blobs[f"res4_2_branch2b_bn_{names[2]}"]))
        assert torch.equal(bn.weight, torch.from_numpy(small_blobs["res4_2_branch2b_bn_s"]))
    del blobs["res2_1_branch2a_bn_riv"]  # one statistic missing from an unfolded file is reported, not filled
    with pytest.raises(ValueError, match=r"res2_1_branch2a_bn_riv \(layer1\.1\.bn1\.running_var\)"):
        B.load_weights(_resnet(SMALL), _write(tmp_path, blobs))


def test_group_norm_blobs(tmp_path, gn_blobs):
    model = _resnet(SMALL_GN, norm="GN")
    B.load_weights(model, _write(tmp_path, gn_blobs))
    assert torch.equal(model.layer2[0].downsample[1].weight, torch.from_numpy(gn_blobs["res3_0_branch1_gn_s"]))


@pytest.mark.parametrize(
    "norm, groups, stride_in_1x1, warns",
    [
        ("bn", 1, True, None),  # MSRA R-50.pkl, as trained
        ("bn", 1, False, "stride_in_1x1=True"),
        ("bn", 2, False, None),  # FAIR's ResNeXt
        ("bn", 2, True, "stride_in_1x1=False"),
        ("gn", 1, False, None),  # R-50-GN.pkl
        ("gn", 1, True, "stride_in_1x1=False"),
    ],
)
def test_stride_placement_that_differs_from_the_files_kind_warns(
    tmp_path, gn_blobs, caplog, norm, groups, stride_in_1x1, warns
):
    blobs = {b.replace("_gn_", f"_{norm}_"): v for b, v in gn_blobs.items()}
    if groups != 1:  # the same layout, grouped 3x3s
        blobs = {b: v[:, : v.shape[1] // groups] if b.endswith("branch2b_w") else v for b, v in blobs.items()}
    model = _resnet(SMALL_GN, groups=groups, width_per_group=64 // groups, stride_in_1x1=stride_in_1x1,
                    norm="GN" if norm == "gn" else "FrozenBN")
    path = _write(tmp_path, blobs)
    with caplog.at_level(logging.WARNING, logger="backbones.detectron"):
        B.load_weights(model, path)
    if warns is None:
        assert not caplog.records
    else:
        assert warns in caplog.text and str(path) in caplog.text


def test_deep_stem_and_avg_down_are_refused(tmp_path, small_blobs):
    path = _write(tmp_path, small_blobs)
    for options in (dict(deep_stem=True), dict(avg_down=True)):
        with pytest.raises(ValueError, match="deep_stem=False and avg_down=False"):
            B.load_weights(_resnet(SMALL, **options), path)


# -- detectron2 detectors: build_detector(style="detectron2") + heads.load_weights ------------------------------


def _decode_masks(rles):
    from pycocotools import mask as mask_utils

    if not rles:
        return None
    encoded = [{"size": r["size"], "counts": r["counts"].encode("ascii")} for r in rles]
    return torch.from_numpy(mask_utils.decode(encoded)).permute(2, 0, 1).bool()


@pytest.fixture(scope="module", params=sorted(DETECTOR_CASES))
def detector_reference(request, tmp_path_factory):
    """(case, detectron2's detections per image, its float32 noise, the zoo-style .pkl of the same weights)."""
    name = request.param
    case = DETECTOR_CASES[name]
    with safe_open(os.path.join(DATA, f"{name}.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    assert json.loads(metadata["case"]) == json.loads(json.dumps(case._asdict()))
    state = detectron2_rcnn_state(case)
    assert blobs_digest(state) == metadata["state_sha256"], "the generator no longer makes the reference's weights"
    images = reference_images(case)
    assert blobs_digest({str(i): im for i, im in enumerate(images)}) == metadata["images_sha256"]
    masks = json.loads(metadata["masks_rle"])
    reference = []
    for i in range(len(images)):
        entry = {key: tensors[f"{key}{i}"] for key in ("boxes", "scores", "classes", "proposals")}
        entry["masks"] = _decode_masks(masks[i]) if masks else None
        reference.append(entry)
    path = tmp_path_factory.mktemp("zoo") / f"{name}.pkl"
    write_detectron2_pkl(state, path)
    return case, images, reference, json.loads(metadata["float32_noise"]), path


def _mask_ious(ours, theirs):
    ours = ours[:, 0] >= 0.5  # detectron2's threshold
    inter = (ours & theirs).flatten(1).sum(1)
    union = (ours | theirs).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter, dtype=torch.float64))


def test_detectron2_zoo_weights_give_detectron2s_detections(detector_reference):
    """Same detections as detectron2's GeneralizedRCNN on the same weights: float64 within 1e-3 px (boxes), 1e-5
    (scores) and mask IoU 0.99; float32 within twice detectron2's own float32-vs-float64 distance."""
    case, images, reference, noise, path = detector_reference
    model = heads.build_detector(case.kind, "resnet50", **case.build_options()).eval()
    result = heads.load_weights(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == [] and result.skipped_keys == []
    assert all(len(r["scores"]) > 10 and r["scores"].max() > 0.3 for r in reference), "a weak reference"

    for dtype in (torch.float64, torch.float32):
        model.to(dtype)
        with torch.no_grad():
            outputs = model([torch.from_numpy(image).to(dtype) for image in images])
        for i, (ours, theirs) in enumerate(zip(outputs, reference)):
            where = f"image {i} in {dtype}"
            assert len(ours["boxes"]) == len(theirs["boxes"]), where
            assert torch.equal(ours["labels"], theirs["classes"] + 1), where
            box_error = (ours["boxes"].double() - theirs["boxes"]).abs().max().item()
            score_error = (ours["scores"].double() - theirs["scores"]).abs().max().item()
            if dtype == torch.float64:
                assert box_error <= 1e-3 and score_error <= 1e-5, (where, box_error, score_error)
            else:
                assert box_error <= 2 * noise["box"] and score_error <= 2 * noise["score"], (
                    where, box_error, score_error, noise)
            if case.kind == "mask_rcnn":
                assert ours["masks"].shape == (len(ours["boxes"]), 1, *images[i].shape[1:]), where
                ious = _mask_ious(ours["masks"], theirs["masks"])
                if dtype == torch.float64:
                    assert ious.min() >= 0.99, (where, ious.min().item())


TINY_D2 = dict(style="detectron2", backbone_options=dict(base_channels=8), fpn_options=dict(out_channels=16),
               box_head_width=32, mask_head_width=16)


def test_detectron2_style_builds_detectron2s_network():
    model = heads.build_detector("mask_rcnn", "resnet50", num_classes=80, **TINY_D2)
    assert model.num_classes == 81  # background included, as for every detector of the library
    assert model.roi_heads.box_predictor.cls_score.out_features == 81  # detectron2's K + 1, background last
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 320  # class-specific, no background deltas
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 80
    body = model.backbone.body
    assert body.layer2[0].conv1.stride == (2, 2) and body.layer2[0].conv2.stride == (1, 1)  # STRIDE_IN_1X1
    assert isinstance(body.bn1, B.FrozenBatchNorm2d) and body.bn1.eps == 1e-5
    assert not any(p.requires_grad for p in body.layer1.parameters()) and body.layer2[0].conv1.weight.requires_grad
    assert list(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5", "p6"]
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (
        0.05, 0.5, 100)
    assert model.roi_heads.box_roi_pool.aligned and model.roi_heads.box_roi_pool.sampling_ratio == 0
    resnext = heads.build_detector("faster_rcnn", "resnext101_32x8d", **TINY_D2)
    assert resnext.backbone.body.layer2[0].conv2.stride == (2, 2)  # FAIR's ResNeXts stride on the 3x3
    assert resnext.backbone.body.layer2[0].conv2.groups == 32
    assert resnext.roi_heads.box_predictor.num_classes == 80  # COCO's, the default
    with pytest.raises(ValueError, match="style='detectron2' detector .* not supported"):
        heads.DetectorForExport(model)  # export re-implements torchvision's pipeline
    with pytest.raises(ValueError, match="does not apply to style='detectron2'"):
        heads.build_detector("faster_rcnn", variant="v2", style="detectron2")
    with pytest.raises(ValueError, match="image_mean do not apply to style='detectron2'.*pixel_mean"):
        heads.build_detector("faster_rcnn", image_mean=(0.5, 0.5, 0.5), **TINY_D2)
    with pytest.raises(ValueError, match="style must be one of"):
        heads.build_detector("faster_rcnn", style="mmdet")
    with pytest.raises(ValueError, match="foreground classes"):
        heads.build_detector("faster_rcnn", num_classes=0, style="detectron2")


def test_anchors_are_detectron2s_unrounded_at_declared_strides():
    from torchvision.models.detection.image_list import ImageList

    from heads.detectron2 import Detectron2AnchorGenerator

    generator = Detectron2AnchorGenerator([32, 64], [4, 64])
    features = [torch.zeros(1, 1, 200, 256), torch.zeros(1, 1, 13, 16)]  # 800 x 1024: 800 / 13 is no stride
    anchors = generator(ImageList(torch.zeros(1, 3, 800, 1024), [(800, 1000)]), features)[0]
    assert anchors.shape == ((200 * 256 + 13 * 16) * 3, 4)
    w, h = math.sqrt(32 * 32 / 0.5), 0.5 * math.sqrt(32 * 32 / 0.5)  # ratio 0.5: 45.25 x 22.63, not rounded
    expected = torch.tensor([-w / 2, -h / 2, w / 2, h / 2])
    torch.testing.assert_close(anchors[0], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(anchors[3], expected + torch.tensor([4.0, 0, 4.0, 0]), rtol=0, atol=1e-5)
    p6_second_location = anchors[200 * 256 * 3 + 3 + 1]  # ratio 1 at (y, x) = (0, 1) on the stride-64 level
    torch.testing.assert_close(p6_second_location, torch.tensor([32.0, -32.0, 96.0, 32.0]))


def test_level_rule_is_detectron2s():
    from heads.detectron2 import Detectron2LevelMapper

    mapper = Detectron2LevelMapper(2, 5)
    sides = torch.tensor([10.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    # floor(4 + log2(side / 224 + 1e-8)), clamped to P2..P5, minus 2
    assert mapper([boxes]).tolist() == [0, 0, 1, 2, 2, 3, 3]


def test_mask_pasting_is_detectron2s_grid_sample():
    """Against ``F.grid_sample`` at the pixel centres (detectron2's sampling), zero beyond one pixel of the box."""
    from heads.detectron2 import paste_masks_detectron2

    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 1, 28, 28, generator=generator, dtype=torch.float64)
    boxes = torch.tensor([[3.2, 4.7, 40.1, 30.0], [0.0, 0.0, 63.0, 47.0], [50.5, 10.2, 51.3, 44.9],
                          [10.0, 20.0, 10.4, 20.3], [-5.0, 30.0, 20.0, 60.0]], dtype=torch.float64)
    height, width = 48, 64
    pasted = paste_masks_detectron2(masks, boxes, (height, width))
    assert pasted.shape == (5, 1, height, width)
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        gy = (ys - y0) / (y1 - y0) * 2 - 1
        gx = (xs - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)[None]
        expected = F.grid_sample(masks[i : i + 1], grid, align_corners=False)[0, 0]
        region = torch.zeros(height, width, dtype=torch.bool)
        region[max(math.floor(y0) - 1, 0) : min(math.ceil(y1) + 1, height),
               max(math.floor(x0) - 1, 0) : min(math.ceil(x1) + 1, width)] = True
        torch.testing.assert_close(pasted[i, 0], torch.where(region, expected, 0.0), rtol=0, atol=1e-12)


def test_resize_rule_is_resize_shortest_edge():
    from heads.detectron2 import resize_shortest_edge

    assert resize_shortest_edge(480, 640, 800, 1333) == (800, 1067)  # 640 * 800 / 480 = 1066.7
    assert resize_shortest_edge(800, 1000, 800, 1333) == (800, 1000)
    assert resize_shortest_edge(600, 2000, 800, 1333) == (400, 1333)  # longer side capped: 600 * 1333 / 2000
    assert resize_shortest_edge(1000, 500, 800, 1333) == (1333, 667)  # portrait: 1600 x 800 capped to 1333


def test_resized_inputs_map_back_to_their_pixels():
    """An image that needs resizing gives the detections of its resized copy, scaled back (boxes and masks)."""
    torch.manual_seed(0)
    model = heads.build_detector("mask_rcnn", "resnet50", num_classes=3, min_size=160, max_size=400, **TINY_D2)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.weight.mul_(300)  # clear detections from random weights
        model.rpn.head.cls_logits.weight.mul_(100)
    model.eval()
    image = torch.rand(3, 80, 100)
    resized = F.interpolate(image[None], size=(160, 200), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        small, large = model([image, resized])
    assert len(small["boxes"]) > 0 and torch.equal(small["labels"], large["labels"])
    torch.testing.assert_close(small["boxes"], large["boxes"] / 2, rtol=0, atol=1e-3)
    torch.testing.assert_close(small["scores"], large["scores"], rtol=0, atol=1e-5)
    assert small["masks"].shape[-2:] == (80, 100) and large["masks"].shape[-2:] == (160, 200)
    assert (small["boxes"][:, 2] <= 100).all() and (small["boxes"][:, 3] <= 80).all()


def _zoo_state():
    return {k: torch.from_numpy(v) for k, v in detectron2_rcnn_state(DETECTOR_CASES["faster_rcnn_R_50_FPN-narrow"]
                                                                     ).items()}


def _narrow_faster():
    return heads.build_detector("faster_rcnn", "resnet50", **DETECTOR_CASES["faster_rcnn_R_50_FPN-narrow"]
                                .build_options())


def test_detectron2_pth_and_names(tmp_path):
    state = _zoo_state()
    path = tmp_path / "model_final.pth"
    torch.save({"model": state, "iteration": 90000}, path)  # detectron2's own checkpoints
    model = _narrow_faster()
    result = heads.load_weights(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ours = model.state_dict()
    pairs = {
        "backbone.body.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
        "backbone.body.bn1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
        "backbone.body.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
        "backbone.body.layer3.5.bn3.bias": "backbone.bottom_up.res4.5.conv3.norm.bias",
        "backbone.fpn.inner_blocks.0.0.weight": "backbone.fpn_lateral2.weight",
        "backbone.fpn.layer_blocks.3.0.bias": "backbone.fpn_output5.bias",
        "rpn.head.conv.0.0.weight": "proposal_generator.rpn_head.conv.weight",
        "rpn.head.cls_logits.bias": "proposal_generator.rpn_head.objectness_logits.bias",
        "rpn.head.bbox_pred.weight": "proposal_generator.rpn_head.anchor_deltas.weight",
        "roi_heads.box_head.fc6.weight": "roi_heads.box_head.fc1.weight",
        "roi_heads.box_head.fc7.bias": "roi_heads.box_head.fc2.bias",
        "roi_heads.box_predictor.cls_score.weight": "roi_heads.box_predictor.cls_score.weight",
    }
    for key, name in pairs.items():
        assert torch.equal(ours[key], state[name]), key


def test_detectron2_key_reports(tmp_path):
    state = _zoo_state()
    extra = dict(state, **{"roi_heads.extra.weight": torch.zeros(1), "pixel_mean": torch.zeros(3, 1, 1)})
    del extra["roi_heads.box_head.fc2.weight"]
    with pytest.raises(ValueError) as info:
        heads.load_weights(_narrow_faster(), extra)
    assert "roi_heads.box_head.fc7.weight" in str(info.value) and "roi_heads.extra.weight" in str(info.value)
    result = heads.load_weights(_narrow_faster(), extra, strict=False)
    assert result.missing_keys == ["roi_heads.box_head.fc7.weight"]
    assert result.unexpected_keys == ["roi_heads.extra.weight"] and result.skipped_keys == ["pixel_mean"]
    wrong = dict(state, **{"backbone.fpn_output3.weight": torch.zeros(32, 32, 1, 1)})
    with pytest.raises(ValueError, match=r"backbone\.fpn\.layer_blocks\.1\.0\.weight"):
        heads.load_weights(_narrow_faster(), wrong)
    # Another class count: the predictor keeps its initial values, as for torchvision's checkpoints.
    other = heads.build_detector("faster_rcnn", "resnet50", **dict(
        DETECTOR_CASES["faster_rcnn_R_50_FPN-narrow"].build_options(), num_classes=3))
    result = heads.load_weights(other, state)
    assert result.skipped_keys == sorted(k for k in other.state_dict() if k.startswith("roi_heads.box_predictor."))
    with pytest.raises(ValueError, match="style='detectron2'"):
        heads.load_weights(heads.build_detector("faster_rcnn", "resnet50", num_classes=81), state)


def test_detectron2_frozen_bn_without_statistics_gets_detectron2s():
    """As detectron2's FrozenBatchNorm2d loading a file without them: mean 0, variance 1."""
    state = {k: v for k, v in _zoo_state().items() if not k.endswith(("running_mean", "running_var"))}
    model = _narrow_faster()
    assert heads.load_weights(model, state).missing_keys == []
    norm = model.backbone.body.layer2[1].bn2
    assert not norm.running_mean.any() and torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_detectron2_style_trains():
    """Losses through torchvision's RPN and RoI heads with the detectron2 parts (background-first adapters)."""
    torch.manual_seed(0)
    model = heads.build_detector("mask_rcnn", "resnet50", num_classes=3, min_size=(96, 128), max_size=200,
                                 **TINY_D2).train()
    masks = torch.zeros(2, 100, 120, dtype=torch.uint8)
    masks[0, 10:50, 20:70] = 1
    masks[1, 40:90, 60:110] = 1
    target = {"boxes": torch.tensor([[20.0, 10.0, 70.0, 50.0], [60.0, 40.0, 110.0, 90.0]]),
              "labels": torch.tensor([1, 3]), "masks": masks}
    losses = model([torch.rand(3, 100, 120)], [target])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad[[0, 2]].abs().sum() > 0  # classes 1 and 3
    assert model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad[1].abs().sum() == 0
