"""CocoDetection, transforms, collation, grouped/resumable sampling and result conversion."""
import json
from collections import Counter

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import DistributedSampler, SequentialSampler
from torchvision import tv_tensors

from tools.engine.coco_dataset import CocoDetection, build_det_transforms, collate_detection
from tools.engine.coco_results import detections_to_coco_results
from tools.engine.det_loader import InfiniteBatches, build_det_loader
from tools.engine.samplers import GroupedBatchSampler
from tools.engine.samplers import ShardSampler


@pytest.fixture(scope="module")
def raw(coco_varied):
    return json.loads(coco_varied["train_ann"].read_text())


@pytest.fixture(scope="module")
def dataset(coco_varied):
    return CocoDetection(coco_varied["train_images"], coco_varied["train_ann"])


def _raw_anns(raw, image_id, crowd=False):
    return [a for a in raw["annotations"] if a["image_id"] == image_id and bool(a["iscrowd"]) == crowd]


def test_sparse_category_mapping(dataset, raw):
    assert dataset.cat_ids == [1, 3, 7]
    assert dataset.cat_id_to_label == {1: 1, 3: 2, 7: 3}
    assert dataset.label_to_cat_id == {1: 1, 2: 3, 3: 7}
    assert dataset.class_names == ["circle", "rectangle", "triangle"]
    for cat_id, label in dataset.cat_id_to_label.items():
        assert dataset.label_to_cat_id[label] == cat_id
    for index in range(len(dataset)):
        _, target = dataset[index]
        got = sorted(dataset.label_to_cat_id[int(l)] for l in target["labels"])
        assert got == sorted(a["category_id"] for a in _raw_anns(raw, target["image_id"]))


def test_sample_format_and_crowd_excluded(dataset, raw):
    assert len(dataset) == len(raw["images"])
    crowd_images = 0
    for index in range(len(dataset)):
        image, target = dataset[index]
        img = next(i for i in raw["images"] if i["id"] == target["image_id"])
        assert dataset.ids[index] == img["id"]
        assert isinstance(image, tv_tensors.Image) and image.dtype == torch.float32
        assert image.shape == (3, img["height"], img["width"]) and 0 <= image.min() and image.max() <= 1
        boxes = target["boxes"]
        assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.format.value == "XYXY"
        assert boxes.dtype == torch.float32 and tuple(boxes.canvas_size) == (img["height"], img["width"])
        assert target["labels"].dtype == torch.int64
        assert target["orig_size"] == (img["height"], img["width"])
        non_crowd = _raw_anns(raw, img["id"])
        crowd_images += bool(_raw_anns(raw, img["id"], crowd=True))
        assert len(boxes) == len(non_crowd) == len(target["masks"])
        expected = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in non_crowd)])
        assert torch.allclose(boxes, expected.reshape(-1, 4), atol=1e-3)
    assert crowd_images > 0
    assert any(a["iscrowd"] for a in dataset.coco.dataset["annotations"])  # kept for evaluation


def test_masks_match_boxes(dataset):
    checked = 0
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks = target["masks"]
        assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
        assert masks.shape[1:] == target["boxes"].canvas_size
        for mask, box in zip(masks, target["boxes"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert torch.allclose(mask_box, box, atol=1.5), (mask_box, box)
            checked += 1
    assert checked > 20


def test_empty_images_kept_or_dropped(coco_varied, dataset):
    empty = [i for i in range(len(dataset)) if len(dataset[i][1]["boxes"]) == 0]
    assert empty
    _, target = dataset[empty[0]]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape[0] == 0 and target["masks"].shape[1:] == target["boxes"].canvas_size
    dropped = CocoDetection(coco_varied["train_images"], coco_varied["train_ann"], drop_empty=True)
    assert len(dropped) == len(dataset) - len(empty)
    assert dropped.dropped["empty_image"] == len(empty)
    assert all(len(dropped[i][1]["boxes"]) > 0 for i in range(len(dropped)))


def test_without_masks(coco_varied):
    ds = CocoDetection(coco_varied["train_images"], coco_varied["train_ann"], with_masks=False)
    assert "masks" not in ds[0][1]


def test_hflip_moves_image_boxes_and_masks_together(dataset):
    index = next(i for i in range(len(dataset)) if len(dataset[i][1]["boxes"]) > 1)
    image, target = dataset[index]
    flipped_image, flipped = build_det_transforms(True, hflip_prob=1.0)(image, target)
    width = image.shape[-1]
    assert torch.equal(flipped_image, image.flip(-1))
    expected = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1],
                            width - target["boxes"][:, 0], target["boxes"][:, 3]], dim=1)
    assert torch.allclose(flipped["boxes"], expected)
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert torch.equal(flipped["labels"], target["labels"])
    for mask, box in zip(flipped["masks"], flipped["boxes"]):  # still consistent after the flip
        xs = torch.nonzero(mask, as_tuple=True)[1]
        assert abs(xs.min() - box[0]) <= 1.5 and abs(xs.max() + 1 - box[2]) <= 1.5


def test_multiscale_resize_keeps_targets_consistent(dataset):
    transform = build_det_transforms(True, min_sizes=(48,), max_size=60, hflip_prob=0.0)
    image, target = dataset[0]
    out_image, out = transform(image, target)
    h, w = out_image.shape[-2:]
    assert max(h, w) <= 60 and (min(h, w) == 48 or max(h, w) == 60)
    assert tuple(out["boxes"].canvas_size) == (h, w) and out["masks"].shape[1:] == (h, w)
    scale = w / image.shape[-1]
    assert torch.allclose(out["boxes"], target["boxes"] * scale, atol=1.0)
    assert out["image_id"] == target["image_id"] and out["orig_size"] == target["orig_size"]


def test_eval_transform_is_identity_and_bad_options_raise(dataset):
    image, target = dataset[0]
    out_image, out = build_det_transforms(False)(image, target)
    assert torch.equal(out_image, image) and torch.equal(out["boxes"], target["boxes"])
    with pytest.raises(ValueError, match="hflip_prob"):
        build_det_transforms(True, hflip_prob=2.0)
    with pytest.raises(ValueError, match="max_size"):
        build_det_transforms(True, max_size=100)


def test_collate_gives_plain_tensors(dataset):
    images, targets = collate_detection([dataset[0], dataset[1]])
    assert len(images) == len(targets) == 2
    assert all(type(img) is torch.Tensor for img in images)
    assert all(type(t[k]) is torch.Tensor for t in targets for k in ("boxes", "labels", "masks"))
    assert targets[1]["image_id"] == dataset.ids[1]


def _orientation(dataset, index):
    return dataset.aspect_ratios[index] >= 1


def test_grouped_sampler_one_orientation_per_batch_covers_every_index(dataset):
    n = len(dataset)
    orientations = Counter(_orientation(dataset, i) for i in range(n))
    assert len(orientations) == 2  # the data has both, so grouping is exercised
    sampler = GroupedBatchSampler(SequentialSampler(range(n)), dataset.aspect_ratios, batch_size=4)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert all(len({_orientation(dataset, i) for i in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)

    full = GroupedBatchSampler(SequentialSampler(range(n)), dataset.aspect_ratios, batch_size=5, drop_last=True)
    batches = list(full)
    assert len(batches) == len(full) == n // 5
    assert all(len(b) == 5 and len({_orientation(dataset, i) for i in b}) == 1 for b in batches)

    by_id = GroupedBatchSampler(range(6), [0, 1, 2, 0, 1, 2], batch_size=2)
    assert list(by_id) == [[0, 3], [1, 4], [2, 5]]


def test_grouped_sampler_with_distributed_sampler(dataset):
    n = len(dataset)
    lengths, seen = [], []
    for rank in range(3):
        inner = DistributedSampler(range(n), num_replicas=3, rank=rank, shuffle=True, seed=0)
        sampler = GroupedBatchSampler(inner, dataset.aspect_ratios, batch_size=3, drop_last=True)
        sampler.set_epoch(2)
        batches = list(sampler)
        lengths.append(len(batches))
        assert len(batches) == len(sampler)
        assert all(len(b) == 3 and len({_orientation(dataset, i) for i in b}) == 1 for b in batches)
        seen += [i for b in batches for i in b]
    assert len(set(lengths)) == 1  # every rank runs the same number of steps
    shards = [list(ShardSampler(n, r, 3)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(n))


def _flatten(batch):
    images, targets = batch
    return [(t["image_id"], img, t["boxes"]) for img, t in zip(images, targets)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for (id_a, img_a, box_a), (id_b, img_b, box_b) in zip(a, b):
        assert id_a == id_b and torch.equal(img_a, img_b) and torch.equal(box_a, box_b)


def test_resumed_batches_equal_uninterrupted_run(coco_varied):
    transforms = build_det_transforms(True, min_sizes=(40, 48, 56), hflip_prob=0.5)
    dataset = CocoDetection(coco_varied["train_images"], coco_varied["train_ann"], transforms, with_masks=False)

    def loader(seed=7, workers=0):
        return build_det_loader(dataset, 4, train=True, seed=seed, workers=workers)

    per_epoch = len(loader())
    assert per_epoch == len(dataset) // 4
    stream = InfiniteBatches(loader())
    full = [_flatten(next(stream)) for _ in range(per_epoch + 3)]  # crosses an epoch boundary
    assert stream.iteration == per_epoch + 3 and stream.epoch == 1
    start = per_epoch - 2
    resumed = InfiniteBatches(loader(), start_iter=start)
    for k in range(start, per_epoch + 3):
        _assert_same(_flatten(next(resumed)), full[k])

    ids = lambda batches: [[i for i, _, _ in b] for b in batches]  # noqa: E731
    assert ids(full[per_epoch:per_epoch + 3]) != ids(full[:3])  # reshuffled each epoch
    other_seed = InfiniteBatches(loader(seed=8))
    assert ids(full[:3]) != ids([_flatten(next(other_seed)) for _ in range(3)])

    with_workers = InfiniteBatches(loader(workers=2), start_iter=1)
    for k in (1, 2):
        _assert_same(_flatten(next(with_workers)), full[k])


def test_loader_does_not_touch_global_rng(dataset):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(InfiniteBatches(build_det_loader(dataset, 2, train=True)))
    assert torch.equal(torch.rand(3), expected)


def test_ungrouped_train_loader_resumes(dataset):
    def first_ids(start):
        images, targets = next(InfiniteBatches(build_det_loader(dataset, 3, train=True, group_aspect=False),
                                               start_iter=start))
        return [t["image_id"] for t in targets]

    per_epoch = len(dataset) // 3
    stream = InfiniteBatches(build_det_loader(dataset, 3, train=True, group_aspect=False))
    ids = [[t["image_id"] for t in next(stream)[1]] for _ in range(per_epoch + 1)]
    assert sorted(sum(ids[:per_epoch], [])) == sorted(dataset.ids)  # one epoch = every image once
    assert first_ids(per_epoch) == ids[per_epoch] and first_ids(2) == ids[2]


def test_eval_loader_covers_each_image_once(dataset):
    loader = build_det_loader(dataset, 3, train=False)
    ids = [t["image_id"] for _, targets in loader for t in targets]
    assert sorted(ids) == sorted(dataset.ids) and len(loader) == len(list(loader))


def test_loader_argument_errors(dataset):
    with pytest.raises(ValueError, match="aspect_ratios"):
        build_det_loader(list(range(4)), 2, train=True)
    with pytest.raises(ValueError, match="batch_size"):
        build_det_loader(dataset, 0, train=True)
    with pytest.raises(ValueError, match="process group"):
        build_det_loader(dataset, 2, train=True, distributed=True)
    with pytest.raises(ValueError, match="training loader"):
        InfiniteBatches(build_det_loader(dataset, 2, train=False))


def test_detections_to_coco_results_restores_dataset_ids(dataset, raw):
    outputs, image_ids = [], []
    for index in range(6):
        _, target = dataset[index]
        n = len(target["boxes"])
        outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                        "scores": torch.linspace(1.0, 0.5, n),
                        "masks": target["masks"].float()[:, None] * 0.9})
        image_ids.append(target["image_id"])
    results = detections_to_coco_results(outputs, image_ids, dataset.label_to_cat_id)
    assert len(results) == sum(len(o["boxes"]) for o in outputs) > 0
    json.dumps(results)  # JSON-ready
    by_image = {}
    for res in results:
        by_image.setdefault(res["image_id"], []).append(res)
    for image_id, entries in by_image.items():
        anns = _raw_anns(raw, image_id)
        assert [e["category_id"] for e in entries] == [a["category_id"] for a in anns]
        for entry, ann in zip(entries, anns):
            assert np.allclose(entry["bbox"], ann["bbox"], atol=1e-3)
            img = dataset.coco.imgs[image_id]
            decoded = mask_utils.decode(entry["segmentation"])
            assert np.array_equal(decoded, dataset.coco.annToMask(ann))
            assert decoded.shape == (img["height"], img["width"])
    assert {r["category_id"] for r in results} <= {1, 3, 7}

    bad = [{"boxes": torch.zeros(1, 4), "labels": torch.tensor([0]), "scores": torch.ones(1)}]
    with pytest.raises(ValueError, match="no category id"):
        detections_to_coco_results(bad, [1], dataset.label_to_cat_id)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
    assert detections_to_coco_results(empty, [1], dataset.label_to_cat_id) == []
