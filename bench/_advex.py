"""Reference side of ``bench/attacks.py``: the PAT authors' attacks (``perceptual-advex``).

Runs inside the reference environment ``bench/.venv`` (see ``bench/README.md``), never in
the project's ``.venv``: it imports ``perceptual_advex`` and NOT ``engine``::

    bench/.venv/bin/python bench/_advex.py --check          # do the imports work?
    bench/.venv/bin/python bench/_advex.py --serve JOB.pt   # started by bench/attacks.py

``JOB.pt`` (written by ``bench/attacks.py``) holds the natural images and labels, the
classifier's and the LPIPS AlexNet's state dicts (the very weights our side attacks and
measures with; for the trained setting also the classifier module itself, torchvision's AlexNet
with a head sized for 64 px, made of torch classes only), the attack name and its constructor
arguments, threads, device and autocast.
The worker builds the reference attack once, then answers one JSON request per stdin line
(``call`` one attack on the batch with a seed and report wall and CPU seconds; ``profile``;
``finish``: save the kept outputs, pass counts and the reference's own LPIPS of its outputs
to a result file) so that the parent can interleave our calls and theirs under the same load.

The attack code runs unmodified. The one shim: ``perceptual_advex.perceptual_attacks`` does
``from torchvision.models.utils import load_state_dict_from_url``, a module torchvision
removed in 0.12 whose function was a re-export of ``torch.hub.load_state_dict_from_url``; we
register a module of that name exporting exactly that function before importing (the
function is only called for ``lpips_model='alexnet_cifar'``, which we do not use).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import sys
import types
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPLY_PREFIX, PassCounter, first_conv, profile_table, timed  # noqa: E402


def install_torchvision_shim() -> None:
    """Provide ``torchvision.models.utils.load_state_dict_from_url`` (removed in 0.12)."""
    try:
        importlib.import_module("torchvision.models.utils")
    except ModuleNotFoundError:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = shim
        torchvision.models.utils = shim


def reply(**message) -> None:
    """One JSON line to the parent (it ignores any other output on stdout)."""
    print(REPLY_PREFIX + json.dumps(message), flush=True)


def build_networks(job: dict, device: torch.device):
    """The classifier and the LPIPS ``FeatureModel``, with the job's weights, as the reference
    code expects them (``AlexNetFeatureModel`` around a torchvision AlexNet for LPIPS)."""
    from perceptual_advex.models import AlexNetFeatureModel, ImageNetNormalizer

    if job.get("classifier_module") is not None:  # a trained module (torch classes only)
        network = job["classifier_module"]
    else:
        network = torchvision.models.get_model(job["arch"], weights=None)
    network.load_state_dict(job["classifier_state"])
    if job["lpips_self"]:
        # Self-bounded: the classifier is its own LPIPS network ('self' in their API).
        if job["arch"] != "alexnet":
            raise SystemExit("self-bounded reference runs are wired for AlexNet only")
        classifier = AlexNetFeatureModel(network)
        lpips_model = classifier
    else:
        classifier = nn.Sequential(ImageNetNormalizer(), network)
        alexnet = torchvision.models.alexnet(weights=None)
        alexnet.features.load_state_dict(job["lpips_state"])  # the 5 convs; pools hold none
        lpips_model = AlexNetFeatureModel(alexnet)
    for network in (classifier, lpips_model):
        network.to(device)
        network.eval()  # their FeatureModel.eval() returns None: do not chain it
    if job["weights"] == "frozen":
        classifier.requires_grad_(False)
        lpips_model.requires_grad_(False)
    # "trainable": parameters keep requires_grad=True, as torchvision (and the authors'
    # get_lpips_model) hand them out; their loss.backward() then also fills weight gradients.
    return classifier, lpips_model


def build_attack(job: dict, classifier: nn.Module, lpips_model: nn.Module):
    from perceptual_advex import perceptual_attacks as pa

    classes = {
        "fast_lpa": pa.FastLagrangePerceptualAttack,
        "lpa": pa.LagrangePerceptualAttack,
        "ppgd": pa.PerceptualPGDAttack,
    }
    lpips_arg = "self" if job["lpips_self"] else lpips_model
    return classes[job["attack"]](classifier, lpips_model=lpips_arg, **job["params"])


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "perceptual-advex": importlib.metadata.version("perceptual-advex"),
    }


def check() -> None:
    """``--check``: import the three reference attack classes and print the versions."""
    install_torchvision_shim()
    from perceptual_advex.perceptual_attacks import (  # noqa: F401
        FastLagrangePerceptualAttack,
        LagrangePerceptualAttack,
        PerceptualPGDAttack,
    )

    print("reference environment OK:", json.dumps(versions()))


def serve(job_path: str) -> None:
    """Answer the parent's JSON-line requests on stdin until ``finish`` (see module doc)."""
    job = torch.load(job_path, weights_only=False)
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    install_torchvision_shim()
    from perceptual_advex.distances import LPIPSDistance

    classifier, lpips_model = build_networks(job, device)
    attack = build_attack(job, classifier, lpips_model)
    images = job["images"].to(device)
    labels = job["labels"].to(device)

    def autocast():
        if job["autocast"] == "none":
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[job["autocast"]]
        return torch.autocast(device.type, dtype=dtype)

    def run(seed: int):
        torch.manual_seed(seed)  # their random start draws from the global RNG
        with autocast():
            return attack(images, labels)

    counter = PassCounter(batch=images.shape[0])
    layers = {"classifier": first_conv(classifier), "lpips": first_conv(lpips_model)}
    outputs, profile = [], None
    reply(ready=True, versions=versions())
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "call":
            watch = counter.watch(layers) if request["count"] else contextlib.nullcontext()
            with watch:
                wall, cpu, adversarial = timed(lambda seed=request["seed"]: run(seed), device)
            if request["keep"]:
                outputs.append(adversarial.detach().float().cpu())
            reply(wall=wall, cpu=cpu)
        elif op == "profile":
            profile = profile_table(lambda seed=request["seed"]: run(seed))
            reply(done=True)
        elif op == "finish":
            distance = LPIPSDistance(lpips_model).to(device)
            with torch.no_grad():
                their_lpips = [distance(images, out.to(device)).float().cpu() for out in outputs]
            torch.save({
                "adversarial": outputs,
                "their_lpips": their_lpips,
                "counts": {name: c.as_dict() for name, c in counter.counts.items()},
                "profile": profile,
                "threads": torch.get_num_threads(),
            }, request["result"])
            reply(done=True)
            return
        else:
            raise SystemExit(f"unknown request {request!r}")


def main() -> None:
    if sys.argv[1:] == ["--check"]:
        check()
    elif len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(sys.argv[2])
    else:
        raise SystemExit("usage: _advex.py --check | --serve JOB.pt")


if __name__ == "__main__":
    main()
