"""Large-scale jitter (build_det_transforms(lsj_size=...)) and batch copy-paste (CopyPaste)."""
import pytest
import torch
from torchvision import tv_tensors
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from tools.engine.coco_dataset import (
    IMAGENET_MEAN,
    CocoDetection,
    boxes_from_masks,
    build_det_transforms,
    collate_detection,
    lsj_detector_options,
)
from tools.engine.copy_paste import CopyPaste
from tools.engine.shapes import make_shapes_coco

SIZE = 64


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return make_shapes_coco(tmp_path_factory.mktemp("coco"), num_train=12, num_val=1, image_size=(40, 100), seed=3)


def _rect_mask(height, width, x1, y1, x2, y2):
    mask = torch.zeros(height, width, dtype=torch.uint8)
    mask[y1:y2, x1:x2] = 1
    return mask


def _sample(height, width, rects, labels=None, crowd=None):
    """Image and tv_tensors target with rectangle instances ``(x1, y1, x2, y2)``."""
    masks = torch.stack([_rect_mask(height, width, *r) for r in rects]) if rects else \
        torch.zeros(0, height, width, dtype=torch.uint8)
    target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor(rects, dtype=torch.float32).reshape(-1, 4),
                                                format="XYXY", canvas_size=(height, width)),
              "labels": torch.tensor(labels if labels is not None else [1] * len(rects), dtype=torch.int64),
              "masks": tv_tensors.Mask(masks), "image_id": 7, "orig_size": (height, width)}
    if crowd is not None:
        target["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
    return tv_tensors.Image(torch.rand(3, height, width)), target


def _check_consistent(image, target, size=SIZE):
    assert image.shape == (3, size, size)
    boxes, masks = target["boxes"], target["masks"]
    assert tuple(boxes.canvas_size) == (size, size) and masks.shape == (len(boxes), size, size)
    assert len(target["labels"]) == len(boxes)
    assert masks.flatten(1).any(1).all()  # no instance without pixels survives
    assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
    assert torch.allclose(boxes, boxes_from_masks(masks), atol=1.0)


# ---------------------------------------------------------------- large-scale jitter

def test_lsj_dataset_exact_size_and_consistent_boxes(paths):
    dataset = CocoDetection(paths["train_images"], paths["train_ann"], build_det_transforms(train=True, lsj_size=SIZE))
    torch.manual_seed(0)
    seen_empty = seen_some = 0
    for _ in range(3):
        for index in range(len(dataset)):
            image, target = dataset[index]
            _check_consistent(image, target)
            seen_empty += len(target["boxes"]) == 0
            seen_some += len(target["boxes"]) > 0
    assert seen_empty and seen_some


def test_lsj_box_only_data(paths):
    dataset = CocoDetection(paths["train_images"], paths["train_ann"], build_det_transforms(train=True, lsj_size=SIZE),
                            with_masks=False)
    torch.manual_seed(1)
    for index in range(len(dataset)):
        image, target = dataset[index]
        boxes = target["boxes"]
        assert image.shape == (3, SIZE, SIZE) and "masks" not in target and len(target["labels"]) == len(boxes)
        assert (boxes >= 0).all() and (boxes <= SIZE).all() and (boxes[:, 2:] - boxes[:, :2] >= 1).all()


def test_lsj_masks_follow_the_pixels():
    """A red rectangle on grey: after the jitter its mask still covers red pixels, and its box is its mask's."""
    image, target = _sample(48, 80, [(20, 10, 60, 40)])
    image = torch.full_like(image, 0.5)
    image[:, 10:40, 20:60] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    transforms = build_det_transforms(train=True, lsj_size=SIZE)
    torch.manual_seed(2)
    kept = 0
    for _ in range(30):
        out_image, out = transforms(tv_tensors.Image(image), target)
        _check_consistent(out_image, out)
        if len(out["masks"]) and out["masks"][0].sum() >= 16:
            kept += 1
            inside = out["masks"][0].bool()
            red = out_image[0] - out_image[1]  # 1 on the rectangle, about 0 on grey and on the padding
            assert red[inside].mean() > 0.7
            near = torch.nn.functional.max_pool2d(inside[None, None].float(), 5, 1, 2)[0, 0].bool()
            assert (red[~near].abs() < 0.05).all()
    assert kept > 10


def test_lsj_drops_instances_outside_the_crop_with_their_labels_and_crowd_flags():
    # scale 2: the 96x96 image becomes 64x64, a random 32x32 crop keeps each corner object with chance 1/4
    image, target = _sample(96, 96, [(0, 0, 24, 24), (72, 72, 96, 96)], labels=[1, 2], crowd=[0, 1])
    transforms = build_det_transforms(train=True, lsj_size=32, lsj_scale=(2.0, 2.0), hflip_prob=0.0)
    torch.manual_seed(3)
    counts = set()
    for _ in range(30):
        out_image, out = transforms(image, target)
        _check_consistent(out_image, out, size=32)
        assert len(out["iscrowd"]) == len(out["labels"])
        assert set(zip(out["labels"].tolist(), out["iscrowd"].tolist())) <= {(1, 0), (2, 1)}
        for label, box in zip(out["labels"].tolist(), out["boxes"].tolist()):
            assert box[:2] == [0, 0] if label == 1 else box[2:] == [32, 32]
        counts.add(len(out["labels"]))
    assert 0 in counts and 1 in counts


def test_lsj_empty_image():
    image, target = _sample(30, 50, [])
    torch.manual_seed(4)
    out_image, out = build_det_transforms(train=True, lsj_size=SIZE)(image, target)
    _check_consistent(out_image, out)
    assert len(out["boxes"]) == 0 and out["image_id"] == 7


def test_lsj_pads_with_the_mean_colour():
    image, target = _sample(SIZE, SIZE, [(8, 8, 40, 40)])
    image = torch.zeros_like(image)
    out_image, out = build_det_transforms(train=True, lsj_size=SIZE, lsj_scale=(0.25, 0.25))(
        tv_tensors.Image(image), target)
    black = (out_image == 0).all(0)
    mean = (out_image == torch.tensor(IMAGENET_MEAN)[:, None, None]).all(0)
    assert black.sum() == 16 * 16 and mean.sum() == SIZE * SIZE - 16 * 16
    assert out["masks"].bool()[0].logical_and(mean).sum() == 0
    assert out["boxes"].tolist() == boxes_from_masks(out["masks"]).tolist()
    assert (out["boxes"][0, 2:] - out["boxes"][0, :2]).tolist() == [8, 8]


def test_lsj_detector_resize_is_the_identity():
    options = lsj_detector_options(SIZE)
    assert options == {"min_size": (SIZE,), "max_size": SIZE}
    transform = GeneralizedRCNNTransform(options["min_size"], options["max_size"], [0, 0, 0], [1, 1, 1]).train()
    image = torch.rand(3, SIZE, SIZE)
    masks = torch.randint(0, 2, (2, SIZE, SIZE), dtype=torch.uint8)
    boxes = torch.tensor([[1.5, 2.0, 30.0, 40.0], [0.0, 0.0, 64.0, 64.0]])
    batch, targets = transform([image], [{"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}])
    assert torch.equal(batch.tensors[0], image) and batch.image_sizes == [(SIZE, SIZE)]
    assert torch.equal(targets[0]["boxes"], boxes) and torch.equal(targets[0]["masks"], masks)
    batch, _ = transform.eval()([torch.rand(3, 40, 100)])
    assert batch.image_sizes == [(25, SIZE)]  # evaluation: longer side lsj_size


@pytest.mark.parametrize("kwargs, match", [
    ({"lsj_size": 0}, "lsj_size must be a positive integer"),
    ({"lsj_size": 64.5}, "lsj_size must be a positive integer"),
    ({"lsj_size": 64, "min_sizes": (32,)}, "lsj_size replaces min_sizes"),
    ({"lsj_size": 64, "lsj_scale": (0.0, 2.0)}, "lsj_scale"),
    ({"lsj_size": 64, "lsj_scale": (2.0, 1.0)}, "lsj_scale"),
    ({"lsj_size": 64, "lsj_scale": (0.5,)}, "lsj_scale"),
    ({"lsj_size": 64, "lsj_fill": (0.5, 0.5)}, "lsj_fill"),
])
def test_lsj_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_det_transforms(train=True, **kwargs)
    with pytest.raises(ValueError, match="lsj_size"):
        lsj_detector_options(-1)


# ---------------------------------------------------------------- copy-paste

def _batch(*samples):
    return collate_detection([_sample(*s) for s in samples])


def _occlusion_batch():
    """Image 0: A (half under the pasted object), C (wholly under it), D (clear of it). Image 1: one object B."""
    return _batch((32, 32, [(0, 0, 16, 16), (10, 2, 14, 6), (0, 20, 8, 30)], [1, 2, 3]),
                  (32, 32, [(8, 0, 24, 16)], [4]))


def test_copy_paste_pastes_source_pixels_and_updates_occluded_instances():
    images, targets = _occlusion_batch()
    before = [image.clone() for image in images]
    torch.manual_seed(0)
    out_images, out_targets = CopyPaste(p=1.0)(images, targets)
    out, image = out_targets[0], out_images[0]
    pasted = _rect_mask(32, 32, 8, 0, 24, 16).bool()
    assert torch.equal(image[:, pasted], images[1][:, pasted])  # pasted pixels are the source's
    assert torch.equal(image[:, ~pasted], images[0][:, ~pasted])  # the rest is untouched
    assert out["labels"].tolist() == [1, 3, 4]  # C fully occluded: dropped
    assert out["boxes"].tolist() == [[0, 0, 8, 16], [0, 20, 8, 30], [8, 0, 24, 16]]
    assert torch.equal(out["masks"][0], _rect_mask(32, 32, 0, 0, 8, 16))  # A lost the pasted pixels
    assert torch.equal(out["masks"][1], targets[0]["masks"][2]) and torch.equal(out["masks"][2], pasted.byte())
    assert out["image_id"] == 7 and out["orig_size"] == (32, 32)
    # image 1 received a subset of image 0's instances on top of B
    assert set(out_targets[1]["labels"].tolist()) - {4} <= {1, 2, 3}
    for image, target in zip(out_images, out_targets):
        assert torch.allclose(target["boxes"], boxes_from_masks(target["masks"]), atol=1.0)
    assert all(torch.equal(a, b) for a, b in zip(images, before))  # inputs are not modified
    assert targets[0]["labels"].tolist() == [1, 2, 3] and len(targets[0]["masks"]) == 3


def test_copy_paste_keeps_untouched_boxes_and_min_visible():
    images, targets = _occlusion_batch()
    targets[0]["boxes"][2] = torch.tensor([0.5, 20.25, 7.75, 29.5])  # an annotation box that is not the mask's
    torch.manual_seed(0)
    _, out = CopyPaste(p=1.0)(images, targets)
    assert out[0]["boxes"][1].tolist() == [0.5, 20.25, 7.75, 29.5]
    torch.manual_seed(0)
    _, out = CopyPaste(p=1.0, min_visible=0.6)(images, targets)
    assert out[0]["labels"].tolist() == [3, 4]  # A kept only half of its pixels
    torch.manual_seed(0)
    _, out = CopyPaste(p=1.0, min_visible=0.4)(images, targets)
    assert out[0]["labels"].tolist() == [1, 3, 4]


def test_copy_paste_p0_and_single_image_are_the_identity():
    images, targets = _occlusion_batch()
    state = torch.get_rng_state()
    out_images, out_targets = CopyPaste(p=0.0)(images, targets)
    assert all(a is b for a, b in zip(out_images + out_targets, images + targets))
    assert torch.equal(torch.get_rng_state(), state)
    out_images, out_targets = CopyPaste(p=1.0)(images[:1], targets[:1])
    assert out_images[0] is images[0] and out_targets[0] is targets[0]


def test_copy_paste_is_deterministic_under_a_seed():
    images, targets = _batch(*[(32, 32, [(i, i, i + 12, i + 10), (20 - i, 4, 30, 14 + i)], [i + 1, i + 5])
                               for i in range(4)])

    def run(seed, generator=False):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed) if generator else None
        out = CopyPaste(p=0.5, generator=gen)(images, targets)
        return [img for img in out[0]], [t["labels"].tolist() for t in out[1]], [t["boxes"] for t in out[1]]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[0] + a[2], b[0] + b[2])) and a[1] == b[1]

    assert same(run(1), run(1))
    assert same(run(1, generator=True), run(1, generator=True))
    assert not all(same(run(1), run(seed)) for seed in range(2, 6))


def test_copy_paste_images_of_different_sizes_paste_the_overlap():
    # image 0 is 20x20, its source 32x40 with an object cut by the overlap and one outside it
    images, targets = _batch((20, 20, [(0, 0, 4, 4)], [1]), (32, 40, [(10, 10, 30, 30), (24, 24, 36, 30)], [2, 3]))
    for seed in range(5):
        torch.manual_seed(seed)
        out_images, out_targets = CopyPaste(p=1.0)(images, targets)
        out = out_targets[0]
        assert out_images[0].shape == images[0].shape and out["masks"].shape[-2:] == (20, 20)
        assert out["labels"].tolist() == [1, 2]  # the object outside the overlap is never chosen
        assert out["boxes"][1].tolist() == [10, 10, 20, 20]
        assert torch.equal(out_images[0][:, 10:, 10:], images[1][:, 10:20, 10:20])
        # the small image's object fits in the large one
        assert out_targets[1]["labels"].tolist() == [2, 3, 1] and out_targets[1]["masks"].shape[-2:] == (32, 40)
        assert out_targets[1]["boxes"][2].tolist() == [0, 0, 4, 4]


def test_copy_paste_empty_images_and_crowd_flags():
    images, targets = _batch((16, 16, []), (16, 16, [(2, 2, 6, 6)], [5]))
    for target, crowd in zip(targets, ([], [0])):
        target["iscrowd"] = torch.tensor(crowd, dtype=torch.int64)
    torch.manual_seed(0)
    out_images, out_targets = CopyPaste(p=1.0)(images, targets)
    assert out_targets[0]["labels"].tolist() == [5] and out_targets[0]["iscrowd"].tolist() == [0]
    assert out_images[1] is images[1] and out_targets[1] is targets[1]  # nothing to paste from an empty image


def test_copy_paste_after_lsj_on_a_loader_batch(paths):
    dataset = CocoDetection(paths["train_images"], paths["train_ann"], build_det_transforms(train=True, lsj_size=SIZE))
    torch.manual_seed(5)
    images, targets = collate_detection([dataset[i] for i in range(len(dataset))])
    out_images, out_targets = CopyPaste(p=1.0)(images, targets)
    assert sum(len(t["labels"]) for t in out_targets) > sum(len(t["labels"]) for t in targets)
    for image, target in zip(out_images, out_targets):
        assert image.shape == (3, SIZE, SIZE) and target["masks"].flatten(1).any(1).all()
        assert len(target["labels"]) == len(target["boxes"]) == len(target["masks"])
        assert torch.allclose(target["boxes"], boxes_from_masks(target["masks"]), atol=1.0)


def test_copy_paste_bad_input():
    images, targets = _occlusion_batch()
    box_only = [{k: v for k, v in t.items() if k != "masks"} for t in targets]
    with pytest.raises(ValueError, match="needs instance masks"):
        CopyPaste(p=0.5)(images, box_only)
    with pytest.raises(ValueError, match="one target per image"):
        CopyPaste(p=0.5)(images, targets[:1])
    bad = [dict(targets[0], labels=targets[0]["labels"][:1]), targets[1]]
    with pytest.raises(ValueError, match="3 masks but 1 labels"):
        CopyPaste(p=0.5)(images, bad)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\], got 1.5"):
        CopyPaste(p=1.5)
    with pytest.raises(ValueError, match="min_visible"):
        CopyPaste(p=0.5, min_visible=-0.1)


def test_boxes_from_masks_edges():
    masks = torch.stack([_rect_mask(8, 10, 3, 1, 6, 2), torch.zeros(8, 10, dtype=torch.uint8)])
    assert boxes_from_masks(masks).tolist() == [[3, 1, 6, 2], [0, 0, 0, 0]]
    assert boxes_from_masks(torch.zeros(0, 8, 10)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8])
def test_copy_paste_mask_dtypes_without_warnings(dtype, recwarn):
    images, targets = _occlusion_batch()
    targets = [dict(t, masks=t["masks"].to(dtype)) for t in targets]
    torch.manual_seed(0)
    _, out = CopyPaste(p=1.0, min_visible=0.1)(images, targets)
    assert out[0]["labels"].tolist() == [1, 3, 4] and out[0]["masks"].dtype == dtype
    assert out[0]["boxes"].tolist() == [[0, 0, 8, 16], [0, 20, 8, 30], [8, 0, 24, 16]]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_copy_paste_on_the_gpu_matches_the_cpu():
    images, targets = _batch(*[(32, 32, [(i, i, i + 12, i + 10), (20 - i, 4, 30, 14 + i)], [i + 1, i + 5])
                               for i in range(4)])
    gpu_images = [image.cuda() for image in images]
    gpu_targets = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets]
    torch.manual_seed(0)
    cpu = CopyPaste(p=0.7)(images, targets)
    torch.manual_seed(0)
    gpu = CopyPaste(p=0.7)(gpu_images, gpu_targets)
    for a, b in zip(cpu[0], gpu[0]):
        assert torch.equal(a, b.cpu())
    for a, b in zip(cpu[1], gpu[1]):
        assert all(torch.equal(a[k], b[k].cpu()) for k in ("boxes", "labels", "masks"))
