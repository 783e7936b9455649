"""Detectron/detectron2 ``.pkl`` files: safe unpickling, Caffe2 ResNet names, and features equal to detectron2's.

The reference features in ``tests/data/detectron`` come from detectron2's own ``DetectionCheckpointer`` and
``build_resnet_backbone`` (``tools/make_detectron_reference.py``); the weights are rebuilt here from the same seed.
"""
import json
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import backbones as B
from backbones.detectron import caffe2_to_resnet_name, is_caffe2_state, resnet_to_caffe2_name
from backbones.weights import UnsafeCheckpointError, compare_state_dicts, read_checkpoint, read_file
from tools.make_detectron_reference import (
    CASES,
    Case,
    Python2Pickler,
    blobs_digest,
    caffe2_resnet_blobs,
    fixture_arrays,
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
