"""Fuzz-style bad-data cases: every mutation of a valid set ends handled (dropped, counted, one summary
line) or as ValueError/OSError naming the file or the annotation id; never a wrong label."""
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.engine.coco_dataset import CocoDetection

LOGGER = "tools.engine.coco_dataset"


@pytest.fixture(scope="module")
def base(coco_shapes):
    """The training images' folder and the parsed annotations the cases mutate (copies of them)."""
    return Path(coco_shapes["train_images"]), json.loads(Path(coco_shapes["train_ann"]).read_text())


@dataclass
class Case:
    """What the mutated set must produce: an error matching ``error`` (``{file}``, ``{ann}``, ``{image}``
    are filled in), or success with ``dropped`` counts (``clipped`` boxes)."""
    error: str | None = None
    dropped: dict | None = None
    clipped: int = 0
    ann: int | None = None      # the id of the annotation the message must name
    image: str | None = None    # the image path the message must name
    kwargs: dict | None = None


def _first(anns, kind="polygon", crowd=False):
    for ann in anns:
        segm = ann["segmentation"]
        is_kind = {"polygon": isinstance(segm, list),
                   "rle_list": isinstance(segm, dict) and isinstance(segm["counts"], list),
                   "rle_str": isinstance(segm, dict) and isinstance(segm["counts"], str)}[kind]
        if is_kind and bool(ann["iscrowd"]) == crowd:
            return ann
    raise LookupError(kind)


def _annotated_image(data):
    ids = {a["image_id"] for a in data["annotations"]}
    return next(img for img in data["images"] if img["id"] in ids)


# --- annotation-file mutations: each takes (data, root) and returns a Case -----------------------

def drop_key(key):
    def mutate(data, root):
        ann = _first(data["annotations"])
        del ann[key]
        return Case(error=f"annotation id {ann['id']} is missing", ann=ann["id"])
    return mutate


def missing_ann_id(data, root):
    del data["annotations"][2]["id"]
    return Case(error="annotation #2 needs an integer 'id'")


def image_missing(key):
    def mutate(data, root):
        del data["images"][1][key]
        return Case(error=rf"image #1 .* is missing \['{key}'\]")
    return mutate


def missing_categories(data, root):
    del data["categories"]
    return Case(error="missing or non-list 'categories'")


def set_bbox(values, expected):
    def mutate(data, root):
        ann = _first(data["annotations"])
        ann["bbox"] = values(ann["bbox"], next(i for i in data["images"] if i["id"] == ann["image_id"]))
        if expected == "error":
            return Case(error=f"annotation id {ann['id']} bbox must be 4 numbers", ann=ann["id"])
        if expected == "clipped":
            return Case(dropped={}, clipped=1)
        return Case(dropped={"bad_box": 1})
    return mutate


def unknown_image(data, root):
    data["annotations"][0]["image_id"] = 987_654
    return Case(dropped={"unknown_image": 1})


def unknown_category(data, root):
    ann = data["annotations"][1]
    ann["category_id"] = 2  # a valid *label*, but not a category id of this file
    return Case(error=f"annotation id {ann['id']} has category_id 2, which is not among", ann=ann["id"])


def duplicate_image_id(data, root):
    data["images"][2]["id"] = data["images"][1]["id"]
    return Case(error=f"duplicate image id {data['images'][1]['id']}")


def duplicate_ann_id(data, root):
    data["annotations"][3]["id"] = data["annotations"][1]["id"]
    return Case(error=f"duplicate annotation id {data['annotations'][1]['id']}")


def duplicate_category_id(data, root):
    data["categories"].append({"id": 3, "name": "square"})
    return Case(error="duplicate category id 3")


def set_segmentation(kind, value, reason):
    def mutate(data, root):
        ann = _first(data["annotations"], kind)
        ann["segmentation"] = value(ann["segmentation"])
        return Case(dropped={reason: 1})
    return mutate


def crowd_value(data, root):
    ann = data["annotations"][0]
    ann["iscrowd"] = 2
    return Case(error=f"annotation id {ann['id']} iscrowd must be 0 or 1", ann=ann["id"])


def no_area_no_iscrowd(data, root):
    for ann in data["annotations"]:
        if not ann["iscrowd"]:
            del ann["iscrowd"], ann["area"]
    return Case(dropped={})


def zero_width_image(data, root):
    data["images"][0]["width"] = 0
    return Case(error=f"image id {data['images'][0]['id']} needs positive integer width/height")


def file_name(value, allow=False):
    def mutate(data, root):
        img = data["images"][0]
        outside = root.parent / "outside.jpg"
        shutil.copy(root / img["file_name"], outside)
        img["file_name"] = value(root, outside)
        if allow:
            return Case(dropped={}, kwargs={"allow_outside_root": True})
        return Case(error=f"file_name .* is absolute or leaves")
    return mutate


def harmless_dotdot(data, root):
    img = data["images"][0]
    img["file_name"] = "sub/../" + img["file_name"]  # stays inside the root
    return Case(dropped={})


def missing_file(data, root):
    img = data["images"][2]
    img["file_name"] = "nope.jpg"
    return Case(error="image file not found", image=str(root / "nope.jpg"))


def top_level_list(data, root):
    return Case(error="top level must be a JSON object")


def set_polygon_value(index, value, reason):
    def mutate(data, root):
        ann = _first(data["annotations"], "polygon")
        img = next(i for i in data["images"] if i["id"] == ann["image_id"])
        ann["segmentation"][0][index] = value(img)
        return Case(dropped={reason: 1} if reason else {})
    return mutate


def set_area(value):
    def mutate(data, root):
        ann = _first(data["annotations"])
        ann["area"] = value
        return Case(dropped={})
    return mutate


def set_image_id(value, error=None):
    def mutate(data, root):
        img = _annotated_image(data)
        for ann in data["annotations"]:
            if ann["image_id"] == img["id"]:
                ann["image_id"] = value
        img["id"] = value
        return Case(error=error, dropped=None if error else {})
    return mutate


def set_category_id(value, error=None):
    def mutate(data, root):
        old = data["categories"][0]["id"]
        data["categories"][0]["id"] = value
        for ann in data["annotations"]:
            if ann["category_id"] == old:
                ann["category_id"] = value
        return Case(error=error, dropped=None if error else {})
    return mutate


def annotation_id_too_large(data, root):
    data["annotations"][1]["id"] = 2**64
    return Case(error="annotation #1 id 18446744073709551616 does not fit a 64-bit integer")


def huge_image(data, root):
    data["images"][1]["width"] = 70_000
    return Case(error=f"image id {data['images'][1]['id']} is 70000x.* at most 65535")


JSON_CASES = {
    "missing_bbox": drop_key("bbox"),
    "missing_category_id": drop_key("category_id"),
    "missing_image_id": drop_key("image_id"),
    "missing_annotation_id": missing_ann_id,
    "image_missing_file_name": image_missing("file_name"),
    "image_missing_width": image_missing("width"),
    "missing_categories": missing_categories,
    "negative_width": set_bbox(lambda b, img: [b[0], b[1], -5.0, b[3]], "dropped"),
    "zero_height": set_bbox(lambda b, img: [b[0], b[1], b[2], 0], "dropped"),
    "nan_box": set_bbox(lambda b, img: [math.nan, b[1], b[2], b[3]], "dropped"),
    "inf_box": set_bbox(lambda b, img: [b[0], b[1], math.inf, b[3]], "dropped"),
    "box_fully_outside": set_bbox(lambda b, img: [img["width"] + 5.0, 2.0, 10.0, 10.0], "dropped"),
    "box_partly_outside": set_bbox(lambda b, img: [-4.0, b[1], b[2] + 4.0, img["height"] - b[1] + 9.0], "clipped"),
    "bbox_three_numbers": set_bbox(lambda b, img: b[:3], "error"),
    "bbox_strings": set_bbox(lambda b, img: ["1", "2", "3", "4"], "error"),
    # numeric extremes: nothing huge reaches pycocotools (a polygon vertex at 1e9 crashed it in C)
    "box_huge": set_bbox(lambda b, img: [0.0, 0.0, 1e9, 1e9], "dropped"),
    "box_far_negative": set_bbox(lambda b, img: [-1e6, b[1], 1e6 + 10, b[3]], "dropped"),
    "box_int_beyond_float": set_bbox(lambda b, img: [10**400, b[1], b[2], b[3]], "dropped"),
    "box_just_inside_tolerance": set_bbox(lambda b, img: [-img["width"] + 1.0, b[1], 2 * img["width"] - 2.0, b[3]],
                                          "clipped"),
    "polygon_vertex_1e9": set_polygon_value(0, lambda img: 1e9, "bad_polygon"),
    "polygon_vertex_far_negative": set_polygon_value(1, lambda img: -1e7, "bad_polygon"),
    "polygon_vertex_int_beyond_float": set_polygon_value(2, lambda img: 10**400, "bad_polygon"),
    "polygon_vertex_inf": set_polygon_value(3, lambda img: math.inf, "bad_polygon"),
    "polygon_vertex_slightly_outside": set_polygon_value(0, lambda img: img["width"] + 3.0, None),
    "rle_size_floats": set_segmentation("rle_list", lambda s: dict(s, size=[float(v) for v in s["size"]]),
                                        "bad_rle"),
    "rle_size_bools": set_segmentation("rle_list", lambda s: dict(s, size=[True, True]), "bad_rle"),
    "area_negative": set_area(-25.0),
    "area_nan": set_area(math.nan),
    "area_int_beyond_float": set_area(10**400),
    "image_id_int64_max": set_image_id(2**63 - 1),
    "image_id_zero": set_image_id(0),
    "image_id_beyond_int64": set_image_id(2**63, error=r"image #\d+ id must be in 0\.\.9223372036854775807"),
    "image_id_negative": set_image_id(-1, error=r"image #\d+ id must be in 0\.\."),
    "category_id_int64_max": set_category_id(2**63 - 1),
    "category_id_beyond_int64": set_category_id(2**63, error=r"category #0 \('circle'\) id must be in 0\.\."),
    "category_id_negative": set_category_id(-1, error=r"category #0 \('circle'\) id must be in 0\.\."),
    "annotation_id_beyond_int64": annotation_id_too_large,
    "image_side_over_65535": huge_image,
    "unknown_image_id": unknown_image,
    "unknown_category_id": unknown_category,
    "duplicate_image_id": duplicate_image_id,
    "duplicate_annotation_id": duplicate_ann_id,
    "duplicate_category_id": duplicate_category_id,
    "polygon_two_points": set_segmentation("polygon", lambda s: [s[0][:4]], "bad_polygon"),
    "polygon_odd_length": set_segmentation("polygon", lambda s: [s[0][:7]], "bad_polygon"),
    "polygon_empty": set_segmentation("polygon", lambda s: [], "bad_polygon"),
    "polygon_strings": set_segmentation("polygon", lambda s: [[str(v) for v in s[0]]], "bad_polygon"),
    "polygon_nan": set_segmentation("polygon", lambda s: [[math.nan] + s[0][1:]], "bad_polygon"),
    "rle_wrong_size": set_segmentation("rle_list", lambda s: dict(s, size=[s["size"][0] + 1, s["size"][1]]),
                                       "bad_rle"),
    "rle_counts_short": set_segmentation("rle_list", lambda s: dict(s, counts=s["counts"][:-1]), "bad_rle"),
    "compressed_rle_wrong_size": set_segmentation("rle_str", lambda s: dict(s, size=[s["size"][0], 5]), "bad_rle"),
    "compressed_rle_garbage": set_segmentation("rle_str", lambda s: dict(s, counts="\x7f\x7f" + s["counts"]),
                                               "bad_rle"),
    "compressed_rle_truncated": set_segmentation("rle_str", lambda s: dict(s, counts=s["counts"][:-3]), "bad_rle"),
    "segmentation_missing": set_segmentation("polygon", lambda s: None, "no_segmentation"),
    "iscrowd_two": crowd_value,
    "no_area_no_iscrowd": no_area_no_iscrowd,
    "zero_width_image": zero_width_image,
    "path_escape": file_name(lambda root, outside: "../outside.jpg"),
    "absolute_path": file_name(lambda root, outside: str(outside)),
    "path_escape_allowed": file_name(lambda root, outside: "../outside.jpg", allow=True),
    "absolute_path_allowed": file_name(lambda root, outside: str(outside), allow=True),
    "harmless_dotdot": harmless_dotdot,
    "missing_image_file": missing_file,
    "top_level_list": top_level_list,
}


def _prepare(tmp_path, base):
    images_src, data = base
    root = tmp_path / "images"
    shutil.copytree(images_src, root)
    return root, json.loads(json.dumps(data))


def _check_dataset(ds, raw_anns_by_id, caplog):
    """Iterate everything and check the invariants of a successfully handled set."""
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]  # exactly one summary line
    for reason, count in ds.dropped.items():
        if count:
            assert f"{reason}={count}" in records[0].getMessage()
    for ann in ds.coco.dataset["annotations"]:  # no annotation changed its category
        assert ann["category_id"] == raw_anns_by_id[ann["id"]]["category_id"]
        assert ann["iscrowd"] in (0, 1) and ann["area"] > 0
    for index in range(len(ds)):
        image, target = ds[index]
        h, w = image.shape[-2:]
        assert image.shape[0] == 3 and torch.isfinite(image).all()
        boxes = target["boxes"]
        assert torch.isfinite(boxes).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert target["masks"].shape == (len(boxes), h, w)
        kept = [a for a in ds.coco.imgToAnns[target["image_id"]] if not a["iscrowd"]]
        got = Counter(ds.label_to_cat_id[int(label)] for label in target["labels"])
        assert got == Counter(a["category_id"] for a in kept)


@pytest.mark.parametrize("name", list(JSON_CASES))
def test_annotation_mutation(name, tmp_path, base, caplog):
    root, data = _prepare(tmp_path, base)
    case = JSON_CASES[name](data, root)
    raw_by_id = {a["id"]: dict(a) for a in data["annotations"] if isinstance(a, dict) and "id" in a}
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data["images"] if name == "top_level_list" else data))
    caplog.set_level(logging.INFO, logger=LOGGER)
    if case.error:
        with pytest.raises((ValueError, OSError), match=case.error) as info:
            ds = CocoDetection(root, ann_file, **(case.kwargs or {}))
            for index in range(len(ds)):
                ds[index]
        message = str(info.value)
        assert str(ann_file) in message or (case.image and case.image in message)
        if case.ann is not None:
            assert f"annotation id {case.ann}" in message
        return
    ds = CocoDetection(root, ann_file, **(case.kwargs or {}))
    expected = dict.fromkeys(ds.dropped, 0) | case.dropped
    assert ds.dropped == expected
    assert ds.clipped == case.clipped
    _check_dataset(ds, raw_by_id, caplog)


def test_non_utf8_and_truncated_json(tmp_path, base):
    root, data = _prepare(tmp_path, base)
    text = json.dumps(data).encode()
    bad_bytes = tmp_path / "latin1.json"
    bad_bytes.write_bytes(text.replace(b'"circle"', b'"c\xe9rcle"'))
    with pytest.raises(ValueError, match="not valid UTF-8") as info:
        CocoDetection(root, bad_bytes)
    assert str(bad_bytes) in str(info.value)
    truncated = tmp_path / "truncated.json"
    truncated.write_bytes(text[: len(text) // 2])
    with pytest.raises(ValueError, match="invalid or truncated JSON") as info:
        CocoDetection(root, truncated)
    assert str(truncated) in str(info.value)
    with pytest.raises(FileNotFoundError):
        CocoDetection(root, tmp_path / "absent.json")


# --- image-file mutations: each rewrites the first annotated image ---------------------------------

def _write_truncated(path, image):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write_zero(path, image):
    path.write_bytes(b"")


def _write_text(path, image):
    path.write_text("this is not an image\n")


def _save(mode, fmt, convert=None):
    def write(path, image):
        (convert or (lambda im: im.convert(mode)))(image).save(path, format=fmt)
    return write


def _sixteen_bit(image):
    gray = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    return Image.fromarray(gray)  # mode I;16


def _gray(image, scale=1.0, dtype=np.float32):
    return (np.asarray(image.convert("L"), dtype=np.float64) * scale).astype(dtype)


def _wide(scale, dtype, fmt="TIFF", poison=None):
    """A float (mode F) or 32-bit integer (mode I) grayscale file; ``poison`` sets one pixel."""
    def write(path, image):
        values = _gray(image, scale, dtype)
        if poison is not None:
            values[1, 1] = poison
        Image.fromarray(values).save(path, format=fmt)
    return write


IMAGE_CASES = {
    "truncated_jpeg": (_write_truncated, "error"),
    "zero_bytes": (_write_zero, "error"),
    "not_an_image": (_write_text, "error"),
    "png_with_jpg_extension": (_save("RGB", "PNG"), "ok"),
    "grayscale": (_save("L", "JPEG"), "ok"),
    "cmyk": (_save("CMYK", "JPEG"), "ok"),
    "rgba": (_save("RGBA", "PNG"), "ok"),
    "palette": (_save("P", "PNG"), "ok"),
    "sixteen_bit_png": (_save(None, "PNG", _sixteen_bit), "ok"),
    # 32-bit and float pixels: PIL's own conversion clips them to 0..255 (floats in [0, 1] came out black)
    "float_unit_range": (_wide(1 / 255, np.float32), "ok"),
    "float_byte_range": (_wide(1.0, np.float32), "ok"),
    "float_nan": (_wide(1 / 255, np.float32, poison=math.nan), "error"),
    "float_inf": (_wide(1 / 255, np.float32, poison=math.inf), "error"),
    "float_out_of_range": (_wide(1.0, np.float32, poison=-1e6), "error"),
    "int32_sixteen_bit_range": (_wide(257, np.int32), "ok"),
    "int32_beyond_sixteen_bits": (_wide(257, np.int32, poison=2**24), "error"),
    "int32_negative": (_wide(257, np.int32, poison=-5), "error"),
    "wrong_size": (lambda path, image: image.resize((image.width + 3, image.height)).save(path, "JPEG"), "size"),
}


@pytest.mark.parametrize("name", list(IMAGE_CASES))
def test_image_mutation(name, tmp_path, base, caplog):
    root, data = _prepare(tmp_path, base)
    img = _annotated_image(data)
    path = root / img["file_name"]
    original = Image.open(path).convert("RGB")
    write, outcome = IMAGE_CASES[name]
    write(path, original)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    caplog.set_level(logging.INFO, logger=LOGGER)
    ds = CocoDetection(root, ann_file)  # images are not read at construction
    if outcome != "ok":
        with pytest.raises((ValueError, OSError)) as info:
            for index in range(len(ds)):
                ds[index]
        assert str(path) in str(info.value)
        return
    _check_dataset(ds, {a["id"]: a for a in data["annotations"]}, caplog)
    image, _ = ds[ds.ids.index(img["id"])]
    reference = torch.from_numpy(np.asarray(original.convert("L"), dtype=np.float32) / 255)
    assert (image.mean(0) - reference).abs().mean() < 0.1  # the right picture, scaled to [0, 1]


def test_pixel_limit_checked_before_decoding(tmp_path, base, monkeypatch):
    root, data = _prepare(tmp_path, base)
    img = _annotated_image(data)
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    ds = CocoDetection(root, ann_file)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", img["width"] * img["height"] - 1)
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image over the pixel limit"))
    with pytest.raises(ValueError, match="over the decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS") as info:
        ds[ds.ids.index(img["id"])]
    assert str(root / img["file_name"]) in str(info.value)


def test_masks_stay_zero_one_through_the_training_transforms(base):
    from tools.engine.coco_dataset import build_det_transforms

    images, data = base
    ds = CocoDetection(images, images.parent / "annotations" / "instances_train.json",
                       build_det_transforms(True, min_sizes=(37, 101), max_size=160, hflip_prob=0.5))
    for index in range(len(ds)):
        _, target = ds[index]
        assert target["masks"].dtype == torch.uint8 and set(target["masks"].unique().tolist()) <= {0, 1}


def test_annotation_ids_from_zero_still_match_in_evaluation(tmp_path, base):
    from tools.engine.coco_eval import evaluate_coco

    root, data = _prepare(tmp_path, base)
    for k, ann in enumerate(data["annotations"]):
        ann["id"] = k  # from 0, as some converters write; pycocotools' evaluation takes id 0 for "unmatched"
    ann_file = tmp_path / "ann.json"
    ann_file.write_text(json.dumps(data))
    ds = CocoDetection(root, ann_file, with_masks=False)
    assert min(ds.coco.anns) == 1 and len(ds.coco.anns) == len(data["annotations"])
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in ds.coco.dataset["annotations"] if not a["iscrowd"]]
    assert evaluate_coco(ds.coco, perfect)["bbox"]["AP"] == pytest.approx(1.0)
