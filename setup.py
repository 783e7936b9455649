"""Installation for resdet: ResNet backbones, detectors and tools for detection."""
from setuptools import find_packages, setup

setup(
    name="resdet",
    version="0.1.0",
    description="ResNet backbones (ResNet/ResNeXt/wide/ResNet-D), FPN, Faster/Mask R-CNN and training tools",
    python_requires=">=3.10",
    # The library only: the command-line tools and their engine (tools/) run from the clone, as detectron2's and
    # MMDetection's do, so that no generic top-level "tools" package lands in site-packages.
    packages=find_packages(include=["backbones", "backbones.*", "heads", "heads.*"]),
    install_requires=[
        # Bounded so that the resolver takes the 2.14 / 0.29 releases instead of pulling a newer build.
        "torch>=2.4,<=2.14.1",
        "torchvision>=0.19,<=0.29.1",
        "timm>=1.0,<2",
        "pycocotools>=2.0.7",
        # COCOeval's matching and accumulation in C++ (tools/engine/coco_eval.py); numpy is its only dependency.
        "faster-coco-eval>=1.8,<2",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "numpy>=1.24",
        "pillow>=9.0",
    ],
    extras_require={
        # ONNX export (torch.onnx.export(dynamo=True) translates with onnxscript), its check, and onnxruntime to run
        # the files (heads.Predictor(onnx=...), tools/infer.py --onnx); PyAV decodes videos for tools/infer.py.
        "export": ["onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.20", "av>=12"],
        # The tests run the export parity checks too, so that the README's two commands set up everything.
        "test": ["pytest>=7.4", "onnx>=1.18", "onnxscript>=0.5", "onnxruntime>=1.20", "av>=12"],
    },
)
