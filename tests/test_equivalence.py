"""Same outputs as torchvision and timm after loading their weights (float32, eval, odd input sizes)."""
import pytest
import timm
import torch

import backbones as B
from tools.reference_models import max_rel_diff, randomize_norm_stats, torchvision_classifier

# (our factory, reference builder, extra options). ResNet-101/152 run at a small input to stay cheap.
TORCHVISION = [
    ("resnet18", {}),
    ("resnet34", {}),
    ("resnet50", {}),
    ("resnet101", {}),
    ("resnet152", {}),
    ("resnext50_32x4d", {}),
    ("wide_resnet50_2", {}),
]


def _compare(ours, ref, x, tol=1e-4):
    ours.eval(), ref.eval()
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert max_rel_diff(a, b) <= tol


@pytest.mark.parametrize("name, options", TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_matches_torchvision(name, options):
    ref = torchvision_classifier(name)
    ours = B.FACTORIES[name](**options)
    B.load_weights(ours, ref.state_dict())
    size = (45, 53) if name in ("resnet101", "resnet152") else (97, 75)
    _compare(ours, ref, torch.randn(2, 3, *size))


def test_feature_extractor_matches_torchvision_intermediate_layers():
    from torchvision.models.feature_extraction import create_feature_extractor

    ref = torchvision_classifier("resnet50", replace_stride_with_dilation=[False, False, True])
    extractor = create_feature_extractor(ref, {f"layer{i}": f"c{i + 1}" for i in range(1, 5)})
    ours = B.resnet50(out_features=("c2", "c3", "c4", "c5"), output_stride=16).eval()
    B.load_weights(ours, ref.state_dict())  # the classifier is dropped for a feature extractor
    x = torch.randn(1, 3, 83, 71)
    with torch.no_grad():
        a, b = extractor(x), ours(x)
    for k in a:
        assert max_rel_diff(a[k], b[k]) <= 1e-4, k


@pytest.mark.parametrize("name, options", [("resnet50", {}), ("resnet50d", {"deep_stem": True, "avg_down": True})])
def test_matches_timm(name, options, tmp_path):
    ref = randomize_norm_stats(timm.create_model(name, pretrained=False))
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    save_file(ref.state_dict(), str(path))
    ours = B.resnet50(**options)
    B.load_weights(ours, path)
    _compare(ours, ref, torch.randn(2, 3, 81, 67))
