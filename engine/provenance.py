"""Provenance: which code and which network weights produced a number, said the same way
everywhere (manifests, stored distance columns, figure labels, command output).

- :func:`code_version`: the package version and, in a git checkout, the commit.
- :func:`weights_state`: ``pretrained``, ``untrained`` or ``sha256:<hex>`` of a weights file.
- :func:`lpips_column`: the stored distance column of an LPIPS network; it names the weights
  state when they are not the standard pretrained ones (``lpips_alexnet_untrained``), so an
  untrained network's distances can never be read as the pretrained network's.
- :func:`distance_label`: the human name of a distance column, e.g. ``LPIPS (AlexNet,
  untrained)``.
"""

from __future__ import annotations

import hashlib
import subprocess
from functools import lru_cache
from pathlib import Path

from .models import NetworkSpec, parse_network

#: Human names of architectures in labels.
ARCH_NAMES = {
    "alexnet": "AlexNet", "alexnet_cifar": "CIFAR AlexNet", "vgg11": "VGG-11",
    "vgg13": "VGG-13", "vgg16": "VGG-16", "vgg19": "VGG-19", "resnet18": "ResNet-18",
    "resnet34": "ResNet-34", "resnet50": "ResNet-50", "resnet101": "ResNet-101",
    "resnet152": "ResNet-152", "wide_resnet50_2": "Wide ResNet-50-2", "self": "self",
}
#: Human names of the image-only distances.
PLAIN_DISTANCES = {"l2": "L2", "linf": "L∞", "ssim": "1 − SSIM"}
WEIGHT_STATES = ("pretrained", "untrained")


@lru_cache(maxsize=1)
def code_version() -> str:
    """``perceptlab <version>`` plus `` (git <commit>[-dirty])`` when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"perceptlab {version('perceptlab')}"
    except PackageNotFoundError:
        text = "perceptlab (not installed)"
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return text
    if commit.returncode == 0 and commit.stdout.strip():
        text += f" (git {commit.stdout.strip()})"
    return text


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_state(spec: str | NetworkSpec) -> str:
    """``pretrained`` (torchvision's ImageNet weights), ``untrained`` (random init) or
    ``sha256:<hex>`` of the weights file of a file-weights network."""
    net = parse_network(spec) if isinstance(spec, str) else spec
    if not net.pretrained:
        return "untrained"
    if net.path is not None:
        path = Path(net.path)
        return f"sha256:{file_sha256(path)}" if path.is_file() else f"file:{net.path}"
    return "pretrained"


def network_record(spec: str | NetworkSpec, role: str) -> dict:
    """What a manifest says about one network: role, spec, architecture, weights state."""
    net = parse_network(spec) if isinstance(spec, str) else spec
    return {"role": role, "spec": str(net), "arch": net.arch, "weights": weights_state(net)}


def lpips_column(spec: str | NetworkSpec) -> str:
    """The name (without the ``lpips_`` prefix) under which an LPIPS network's distances are
    stored: ``alexnet`` (pretrained), ``alexnet_untrained``, ``alexnet_cifar_<sha8>``."""
    net = parse_network(spec) if isinstance(spec, str) else spec
    state = weights_state(net)
    if state == "pretrained":
        return net.arch
    if state == "untrained":
        return f"{net.arch}_untrained"
    return f"{net.arch}_{state.partition(':')[2][:8]}"


def distance_label(column: str) -> str:
    """``lpips_alexnet_untrained`` → ``LPIPS (AlexNet, untrained)``; ``lpips_alexnet`` →
    ``LPIPS (AlexNet, pretrained)``; ``linf`` → ``L∞``; unknown columns unchanged."""
    if column in PLAIN_DISTANCES:
        return PLAIN_DISTANCES[column]
    if not column.startswith("lpips_"):
        return column
    rest = column.removeprefix("lpips_")
    if rest == "self":
        return "LPIPS (self)"
    for arch in sorted(ARCH_NAMES, key=len, reverse=True):  # longest first: alexnet_cifar
        if rest == arch:
            return f"LPIPS ({ARCH_NAMES[arch]}, pretrained)"
        if rest.startswith(arch + "_"):
            state = rest.removeprefix(arch + "_")
            state = state if state in WEIGHT_STATES else f"weights {state}"
            return f"LPIPS ({ARCH_NAMES[arch]}, {state})"
    return f"LPIPS ({rest})"


def untrained_networks(networks: list[dict]) -> list[str]:
    """``["classifier resnet18", "LPIPS alexnet"]``: the untrained ones of a manifest's
    ``networks`` list, for loud notes in outputs."""
    role = {"classifier": "classifier", "lpips": "LPIPS"}
    return [f"{role.get(n['role'], n['role'])} {n['arch']}" for n in networks
            if n.get("weights") == "untrained"]


def untrained_in_params(params: dict) -> list[str]:
    """Network specs among ``params`` (an attack's ``describe()`` or a method's settings)
    that are untrained, e.g. ``["alexnet:untrained"]`` for ``lpips_model=alexnet:untrained``."""
    out = []
    for key, value in params.items():
        if not (key.endswith("lpips_model") or key in ("classifier", "lpips")):
            continue
        try:
            net = parse_network(str(value))
        except Exception:  # "self", run folders and other non-network values
            continue
        if not net.pretrained:
            out.append(str(net))
    return out
