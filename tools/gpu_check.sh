#!/usr/bin/env bash
# A prepared, unattended GPU run (under 8 minutes on one H100/H200) whose results land in ONE JSON file:
#   make_data          the embedded shapes sets (detection and classification), written once
#   bench_cls_infer    tools/benchmark.py --device cuda, ResNet-50 inference row: batch 256, bfloat16 autocast,
#                      channels_last, torch.compile (resdet, torchvision and timm)
#   bench_cls_train    the same for the ResNet-50 training row
#   bench_detectors    tools/benchmark.py --device cuda, Faster R-CNN R50-FPN inference and training rows (bf16
#                      autocast, channels_last)
#   train_det          tools/train_det.py --amp, 200 iterations on the embedded shapes set, then its evaluation
#   train_cls          tools/train_cls.py --amp, 1 epoch on the embedded shapes set
#   torchrun_det       with 2 GPUs or more: torchrun --nproc_per_node 2 tools/train_det.py --amp (NCCL)
# Every step runs under its own time limit; a failing step is recorded with its exit code and the next one runs.
#
# Usage: tools/gpu_check.sh [OUTPUT_DIR]
#   OUTPUT_DIR: default $OUT when set, else output/gpu_check. Writes OUTPUT_DIR/gpu_check.json (the GPU, torch and CUDA
#   versions; per step its command, exit code, wall time and numbers) and each step's log and files under
#   OUTPUT_DIR/steps/<step>/.
# Environment: PYTHON (default python); GPU_CHECK_CPU=1 runs the same steps on CPU with tiny sizes and one or two
# iterations, without compiling (about 2 minutes on 2 busy cores); GPU_CHECK_STEPS="make_data train_det ..." runs
# only the steps named (tests/test_gpu_check.py), the others are recorded as skipped.
set -u
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUTPUT_DIR="${1:-${OUT:-output/gpu_check}}"
mkdir -p "$OUTPUT_DIR/steps"
OUTPUT_DIR="$(cd "$OUTPUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export RESDET_CACHE="${RESDET_CACHE:-$WORK/cache}"  # the embedded sets, generated once
START_ALL=$(date +%s)

if [[ "${GPU_CHECK_CPU:-0}" == 1 ]]; then
    MODE=cpu
    TINY=(--device cpu --quick --no-memory --iters 1 --batch-size 2 --image-size 64 --threads 1)
    BENCH_INFER=("${TINY[@]}" --rows resnet18_infer --amp --channels-last)
    BENCH_TRAIN=("${TINY[@]}" --rows resnet18_train --amp --channels-last)
    BENCH_DET=("${TINY[@]}" --rows faster_rcnn_r18_train)
    MAKE_DATA=(bash -c "'$PYTHON' tools/make_shapes.py --kind coco --output-dir '$WORK/det' --num-train 4 --num-val 2 \
        && '$PYTHON' tools/make_shapes.py --kind imagefolder --output-dir '$WORK/cls' --num-train 4 --num-val 2 \
        --num-classes 2")
    DET_DATA=(--train-images "$WORK/det/train" --train-ann "$WORK/det/annotations/instances_train.json"
              --val-images "$WORK/det/val" --val-ann "$WORK/det/annotations/instances_val.json"
              --backbone resnet18 --min-size 64 --max-size 96 --batch-size 2)
    TRAIN_DET=(--device cpu --iters 2 "${DET_DATA[@]}")
    TRAIN_CLS=(--device cpu --epochs 1 --data "$WORK/cls" --config configs/cls/shapes.yaml --batch-size 4
               --image-size 32)
    TORCHRUN_DET=(--device cpu --iters 2 "${DET_DATA[@]}")
    LIMITS=(120 120 120 120 120 120 120)
else
    MODE=cuda
    BENCH_INFER=(--device cuda --rows resnet50_infer --batch-size 256 --amp --channels-last --compile)
    BENCH_TRAIN=(--device cuda --rows resnet50_train --batch-size 256 --amp --channels-last --compile)
    BENCH_DET=(--device cuda --rows faster_rcnn_infer,faster_rcnn_train --amp --channels-last)
    MAKE_DATA=("$PYTHON" -c "from tools.engine.shapes import default_shapes_coco, default_shapes_imagefolder
default_shapes_coco(); default_shapes_imagefolder()")
    TRAIN_DET=(--device cuda --iters 200 --workers 4)
    TRAIN_CLS=(--device cuda --epochs 1 --workers 4)
    TORCHRUN_DET=(--device cuda --iters 50 --workers 2)
    # Seconds per step (make_data, bench_cls_infer, bench_cls_train, bench_detectors, train_det, train_cls,
    # torchrun_det): 470 in all, so that the run ends within 8 minutes even when every step hits its limit.
    LIMITS=(45 80 110 80 70 45 40)
fi
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

# step NAME LIMIT_S COMMAND...: run COMMAND in OUTPUT_DIR/steps/NAME (log: log.txt) and record its exit code
# (124: over the time limit), wall time and command line there.
step() {
    local name=$1 limit=$2 dir="$OUTPUT_DIR/steps/$1"
    shift 2
    mkdir -p "$dir"
    if [[ -n "${GPU_CHECK_STEPS:-}" && " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        echo "skipped: not in GPU_CHECK_STEPS" > "$dir/skipped.txt"
        return
    fi
    printf '%s\n' "$@" > "$dir/command.txt"
    echo "== $name (limit ${limit} s): $*"
    local start rc ms
    start=$(date +%s%N)
    timeout --kill-after=10 "$limit" "$@" > "$dir/log.txt" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "$rc" > "$dir/exit_code.txt"
    echo "$ms" > "$dir/wall_ms.txt"
    echo "   exit code $rc, $ms ms"
}

S="$OUTPUT_DIR/steps"
step make_data "${LIMITS[0]}" "${MAKE_DATA[@]}"
step bench_cls_infer "${LIMITS[1]}" "$PYTHON" tools/benchmark.py "${BENCH_INFER[@]}" --json "$S/bench_cls_infer/rows.json"
step bench_cls_train "${LIMITS[2]}" "$PYTHON" tools/benchmark.py "${BENCH_TRAIN[@]}" --json "$S/bench_cls_train/rows.json"
step bench_detectors "${LIMITS[3]}" "$PYTHON" tools/benchmark.py "${BENCH_DET[@]}" --json "$S/bench_detectors/rows.json"
step train_det "${LIMITS[4]}" "$PYTHON" tools/train_det.py --amp "${TRAIN_DET[@]}" --output-dir "$S/train_det/run"
step train_cls "${LIMITS[5]}" "$PYTHON" tools/train_cls.py --amp "${TRAIN_CLS[@]}" --output-dir "$S/train_cls/run"
if [[ "$GPUS" -ge 2 ]]; then
    step torchrun_det "${LIMITS[6]}" "$PYTHON" -m torch.distributed.run --nproc_per_node 2 tools/train_det.py --amp \
        "${TORCHRUN_DET[@]}" --output-dir "$S/torchrun_det/run"
else
    mkdir -p "$S/torchrun_det"
    echo "skipped: $GPUS GPU(s), the NCCL run needs 2" > "$S/torchrun_det/skipped.txt"
fi

"$PYTHON" - "$OUTPUT_DIR" "$MODE" "$GPUS" "$START_ALL" <<'EOF'
"""Collect the steps' exit codes, wall times and numbers into OUTPUT_DIR/gpu_check.json."""
import json
import statistics
import sys
import time
from pathlib import Path

out, mode, gpus, start = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def bench_numbers(folder: Path) -> dict:
    data = read_json(folder / "rows.json") or {}
    rows = {}
    for row in data.get("rows", []):
        ours = row["sides"]["resdet"]
        rows[row["row"]] = {"metric": row["metric"], "resdet": ours["value"], "images_per_step": row["images_per_step"],
                            "img_per_s": row["images_per_step"] / ours["median_s"], "ratios": row["ratios"],
                            "references": {k: v["value"] for k, v in row["sides"].items() if k != "resdet"},
                            "peak_mib": ours["peak_mib"], "check": row["check"]}
    return {"rows": rows, "matmul_peak_gflops": data.get("matmul_peak_gflops"), "settings": data.get("settings")}


def train_numbers(folder: Path) -> dict:
    run = folder / "run"
    numbers = {"final": read_json(run / "metrics.json")}
    records = read_jsonl(run / "metrics.jsonl")
    times = [r["time_per_iter"] for r in records if "time_per_iter" in r]
    if times:
        numbers["median_time_per_iter_s"] = statistics.median(times)
    epochs = [r["epoch_time_s"] for r in records if "epoch_time_s" in r]
    if epochs:
        numbers["epoch_time_s"] = epochs
    return numbers


def machine() -> dict:
    import platform

    info = {"python": platform.python_version(), "gpu_count": gpus}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    cpu_capability=torch.backends.cpu.get_cpu_capability())
    except Exception as error:  # the report must be written whatever broke
        info["torch_error"] = repr(error)
    return info


ORDER = ["make_data", "bench_cls_infer", "bench_cls_train", "bench_detectors", "train_det", "train_cls",
         "torchrun_det"]
# The GPU targets (H100/H200 class), from the benchmark rows: (step, row, img/s at least).
TARGETS = {"ResNet-50 training, bf16, channels_last, compiled": ("bench_cls_train", "resnet50_train", 5000),
           "ResNet-50 inference, bf16, channels_last, compiled": ("bench_cls_infer", "resnet50_infer", 20000),
           "Faster R-CNN R50-FPN training per GPU": ("bench_detectors", "faster_rcnn_train", 50)}
steps = {}
for folder in sorted((out / "steps").iterdir(), key=lambda f: ORDER.index(f.name) if f.name in ORDER else 99):
    if (folder / "skipped.txt").exists():
        steps[folder.name] = {"skipped": (folder / "skipped.txt").read_text().strip()}
        continue
    record = {"command": (folder / "command.txt").read_text().split("\n")[:-1],
              "exit_code": int((folder / "exit_code.txt").read_text()),
              "wall_s": int((folder / "wall_ms.txt").read_text()) / 1000}
    if folder.name.startswith("bench_"):
        record["numbers"] = bench_numbers(folder)
    elif (folder / "run").is_dir():
        record["numbers"] = train_numbers(folder)
    if record["exit_code"] != 0:
        record["log_tail"] = (folder / "log.txt").read_text(errors="replace").splitlines()[-30:]
    steps[folder.name] = record
targets = {}
for what, (step_name, row_name, least) in TARGETS.items():
    row = steps.get(step_name, {}).get("numbers", {}).get("rows", {}).get(row_name)
    if row is not None:
        targets[what] = {"img_per_s": row["img_per_s"], "target": least, "met": row["img_per_s"] >= least}
report = {"mode": mode, "machine": machine(), "total_wall_s": time.time() - start, "targets": targets,
          "steps": steps}
(out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
failed = [name for name, s in steps.items() if s.get("exit_code", 0) != 0]
print(f"wrote {out / 'gpu_check.json'}: {len(steps)} steps, failed: {', '.join(failed) or 'none'}")
EOF
