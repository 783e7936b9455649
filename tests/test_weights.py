"""load_weights: formats, nesting, classifier handling, key errors, and refusing code in pickles."""
import os
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import backbones as B
from tools.reference_models import randomize_norm_stats


@pytest.fixture(scope="module")
def tv18():
    return randomize_norm_stats(torchvision.models.resnet18()).eval()


def _same(a, b):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".safetensors"])
def test_file_formats(tv18, tmp_path, suffix):
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(tv18.state_dict(), str(path))
    else:
        torch.save(tv18.state_dict(), path)
    model = B.resnet18()
    B.load_weights(model, path)
    _same(tv18, model)


def test_nested_training_checkpoint_and_ddp_prefix(tv18, tmp_path):
    state = {f"module.{k}": v for k, v in tv18.state_dict().items()}
    path = tmp_path / "train.pth"
    torch.save({"model": state, "optimizer": {"state": {}}, "iteration": 10}, path)
    model = B.resnet18()
    B.load_weights(model, path)
    _same(tv18, model)


def test_feature_extractor_drops_classifier(tv18):
    model = B.resnet18(out_features=("c2", "c3"))
    result = B.load_weights(model, tv18.state_dict())
    assert any(k.startswith("fc.") for k in result.skipped_keys)
    assert any(k.startswith("layer4.") for k in result.skipped_keys)


@pytest.mark.parametrize("out_features", [("c2",), ("c2", "c3")])
def test_feature_extractor_skips_every_stage_it_lacks(tv18, out_features):
    model = B.resnet18(out_features=out_features).eval()
    result = B.load_weights(model, tv18.state_dict())
    unbuilt = ("fc", *(f"layer{i}" for i in range(len(out_features) + 1, 5)))
    assert {k.split(".")[0] for k in result.skipped_keys} == set(unbuilt)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv18.layer1(tv18.maxpool(tv18.relu(tv18.bn1(tv18.conv1(x)))))
        torch.testing.assert_close(model(x)["c2"], ref, rtol=1e-4, atol=1e-4)


def test_classifier_with_other_class_count_is_skipped_with_message(tv18, caplog):
    model = B.resnet18(num_classes=10)
    fc_before = model.fc.weight.clone()
    with caplog.at_level("WARNING"):
        result = B.load_weights(model, tv18.state_dict())
    assert "skipping the classifier" in caplog.text and "1000 classes" in caplog.text
    assert set(result.skipped_keys) == {"fc.weight", "fc.bias"}
    assert torch.equal(model.fc.weight, fc_before)
    torch.testing.assert_close(model.layer4[1].bn2.running_var, tv18.layer4[1].bn2.running_var)


def test_missing_and_unexpected_keys_are_listed(tv18):
    state = dict(tv18.state_dict())
    del state["layer2.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: layer2\.0\.conv1\.weight.*unexpected keys: extra\.weight"):
        B.load_weights(B.resnet18(), state)
    result = B.load_weights(B.resnet18(), state, strict=False)
    assert result.missing_keys == ["layer2.0.conv1.weight"] and result.unexpected_keys == ["extra.weight"]


def test_shape_mismatch_names_the_key(tv18):
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight: checkpoint"):
        B.load_weights(B.resnet50(), tv18.state_dict())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Payload(marker)}, f)
    with pytest.raises(ValueError, match="refused to load"):
        B.load_weights(B.resnet18(), path)
    assert not marker.exists()


def test_missing_file_and_non_dict():
    with pytest.raises(FileNotFoundError):
        B.load_weights(B.resnet18(), "/nonexistent/w.pth")
    with pytest.raises(ValueError, match="dict of tensors"):
        B.load_weights(B.resnet18(), [1, 2])  # type: ignore[arg-type]


def test_fpn_loads_into_its_body(tv18):
    fpn = B.FPN(B.resnet18(out_features=("c2", "c3", "c4", "c5")))
    B.load_weights(fpn, tv18.state_dict())
    torch.testing.assert_close(fpn.body.layer3[0].conv1.weight, tv18.layer3[0].conv1.weight)
