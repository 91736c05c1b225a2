"""Stimuli per protocol (issue 18): ``python -m engine generate --protocol 2afc|rating|label``
is the JND pipeline (same attacks, stimulus mode, distances, PNG bytes) arranged into the
protocol's items and controls, written as a version 3 manifest; JND stays version 2.

Oracles: the JND folder of the same request (one pipeline: copy A and copy B are the JND
pairs' PNGs, byte for byte, and their distances); L2 / L∞ from the PNGs with numpy; SSIM
with scikit-image; the SHA-256 of every file with hashlib."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import structural_similarity

from engine.__main__ import main
from engine.analysis import AT_BOUND
from engine.attacks import parse_attack
from engine.datasets import (
    SKIMAGE_CLASS_NAMES,
    folder_class_names,
    imagenet100_class_names,
    resolve_label_set,
)
from engine.errors import EngineError
from engine.generate import GenerateRequest
from engine.stimuli import PROTOCOL_FIELDS, Manifest

COMMON = ["--classifier", "resnet18:untrained", "--lpips", "alexnet:untrained", "--size", "32",
          "--max-images", "3", "--batch-size", "2", "--device", "cpu", "--seed", "5",
          "--no-progress"]
LINF = "linf:bound=small,num_iterations=2"
L2 = "l2:bound=small,num_iterations=2"


def generate(out: Path, *args: str) -> dict:
    assert main(["generate", "--out", str(out), *args, *COMMON]) == 0
    return json.loads((out / "manifest.json").read_text())


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64) / 255


def image_distances(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    return {"linf": float(np.abs(a - b).max()), "l2": float(np.linalg.norm(a - b)),
            "ssim": float(structural_similarity(a, b, channel_axis=-1, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False,
                                                data_range=1))}


def assert_files_hashed(out: Path, manifest: dict) -> None:
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*.png")}
    assert set(manifest["files"]) == on_disk  # every PNG written is an item's, and listed
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The same request as JND, 2AFC (linf vs l2 at the named bound 'small'), rating
    (single images) and label (a 3-level ladder on the photographs' documented classes)."""
    root = tmp_path_factory.mktemp("protocols")
    generate(root / "jnd", "--spec", LINF, "--spec", L2)
    generate(root / "2afc", "--protocol", "2afc", "--versus", LINF, L2)
    generate(root / "rating", "--protocol", "rating", "--rating-shows", "single", "--spec", LINF,
             "--spec", L2)
    generate(root / "label", "--protocol", "label", "--spec", "linf:num_iterations=2",
             "--ladder", "3", "--bounds", "1/255,16/255")
    return {p.name: p for p in root.iterdir()}


def read(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_jnd_manifests_stay_version_2_without_protocol_fields(folders):
    manifest = read(folders["jnd"])
    assert manifest["version"] == 2 and "protocol" not in manifest
    assert not set(PROTOCOL_FIELDS) & set(manifest["pairs"][0])
    assert not {"protocol", "versus", "rating_shows", "label_set"} & set(
        manifest["generator"]["request"])
    assert Manifest.read(folders["jnd"]).protocol == "jnd"
    header = (folders["jnd"] / "manifest.csv").read_text().splitlines()[0].split(",")
    assert "third_path" not in header and "class_name" not in header


def test_2afc_triplets_are_the_jnd_pairs_side_by_side(folders):
    out, manifest, jnd = folders["2afc"], read(folders["2afc"]), read(folders["jnd"])
    assert (manifest["version"], manifest["protocol"]) == (3, "2afc")
    assert_files_hashed(out, manifest)
    linf, l2 = parse_attack(LINF).spec, parse_attack(L2).spec
    by = {(p["source_image"], p["condition"]): p for p in jnd["pairs"] if p["condition"]}
    triplets = [p for p in manifest["pairs"] if not p["is_sentinel"]]
    assert len(triplets) == 3 and {p["source_image"] for p in triplets} == {
        p["source_image"] for p in jnd["pairs"]}
    for t in triplets:
        assert (t["condition"], t["condition_b"]) == (linf, l2)
        assert (t["threat_model"], t["threat_model_b"]) == ("linf", "l2")
        assert t["bound_b"] == parse_attack(L2).bound and len(t["key"]) <= 300
        assert "linf=small|vs|l2=small" in t["key"]
        a, b = by[(t["source_image"], linf)], by[(t["source_image"], l2)]
        # One pipeline: A and B are the JND pairs' images, bytes and distances alike.
        for item_path, pair in ((t["other_path"], a), (t["third_path"], b)):
            assert (out / item_path).read_bytes() == (folders["jnd"] / pair["other_path"]
                                                      ).read_bytes()
        assert t["natural_path"] == a["natural_path"]
        assert t["distances"] == a["distances"] and t["distances_b"] == b["distances"]
        # Every distance the JND pairs get, reference↔A and reference↔B, from the PNGs.
        ref = pixels(out / t["natural_path"])
        for dist, path in ((t["distances"], t["other_path"]), (t["distances_b"], t["third_path"])):
            assert set(dist) == {"l2", "linf", "ssim", "lpips_alexnet_untrained"}
            oracle = image_distances(ref, pixels(out / path))
            assert dist["linf"] == pytest.approx(oracle["linf"], abs=1e-6)
            assert dist["l2"] == pytest.approx(oracle["l2"], rel=1e-5, abs=1e-6)
            assert dist["ssim"] == pytest.approx(oracle["ssim"], abs=1e-4)
            assert dist["lpips_alexnet_untrained"] > 0
        # Stimulus mode fitted copy B to its bound too (not only copy A).
        mb = t["measures_b"]
        assert mb["fit_scale"] is not None and mb["at_bound"] is True
        assert AT_BOUND <= mb["size_ratio"] <= 1 + 1e-4
        assert mb["stored_size"] == pytest.approx(t["distances_b"]["l2"], rel=1e-5)
        assert t["at_bound"] is True and t["level"] is None and t["class_name"] is None


def test_2afc_control_triplets_show_the_reference_as_copy_a(folders):
    out, manifest = folders["2afc"], read(folders["2afc"])
    controls = [p for p in manifest["pairs"] if p["is_sentinel"]]
    assert len(controls) == 3  # one per source by default, as JND sentinels
    specs = {parse_attack(LINF).spec, parse_attack(L2).spec}
    for c in controls:
        assert c["other_path"] == c["natural_path"] and c["condition"] is None
        assert c["third_path"] != c["natural_path"] and c["condition_b"] in specs
        assert np.array_equal(pixels(out / c["other_path"]), pixels(out / c["natural_path"]))
        ref, b = pixels(out / c["natural_path"]), pixels(out / c["third_path"])
        assert c["distances"]["l2"] == 0 and c["distances"]["lpips_alexnet_untrained"] == 0
        assert c["distances_b"]["linf"] == pytest.approx(np.abs(ref - b).max(), abs=1e-6)
        assert c["distances_b"]["linf"] > 0
        assert "|control|" in c["key"]
    read_back = Manifest.read(out)
    assert read_back.protocol == "2afc" and read_back.to_json() == manifest


def test_rating_items_are_the_jnd_pairs_with_identical_anchors(folders):
    manifest, jnd = read(folders["rating"]), read(folders["jnd"])
    assert (manifest["protocol"], manifest["rating_shows"]) == ("rating", "single")
    assert manifest["generator"]["request"]["rating_shows"] == "single"
    assert_files_hashed(folders["rating"], manifest)
    strip = [{k: v for k, v in p.items() if k not in PROTOCOL_FIELDS and k != "size"}
             for p in manifest["pairs"]]
    assert strip == [{k: v for k, v in p.items() if k != "size"} for p in jnd["pairs"]]
    anchors = [p for p in manifest["pairs"] if p["is_sentinel"]]
    assert anchors and all(p["other_path"] == p["natural_path"] for p in anchors)
    assert all(p["third_path"] is None and p["class_name"] is None for p in manifest["pairs"])


def test_label_items_are_a_ladder_with_true_classes_and_gold_items(folders):
    out, manifest = folders["label"], read(folders["label"])
    assert manifest["protocol"] == "label"
    assert manifest["label_set"] == list(SKIMAGE_CLASS_NAMES.values())
    assert_files_hashed(out, manifest)
    classes = {"astronaut-c0-32": "astronaut", "chelsea-c0-32": "cat", "coffee-c0-32": "coffee"}
    items = [p for p in manifest["pairs"] if not p["is_sentinel"]]
    assert sorted((p["source_image"], p["level"]) for p in items) == sorted(
        (s, level) for s in classes for level in range(3))
    bounds = {p["level"]: p["bound"] for p in items}
    assert bounds[0] == pytest.approx(1 / 255) and bounds[2] == pytest.approx(16 / 255)
    for p in manifest["pairs"]:
        assert p["class_name"] == classes[p["source_image"]]
        if p["is_sentinel"]:  # gold: the unperturbed image, its class known
            assert p["other_path"] == p["natural_path"] and p["level"] is None
        else:
            assert p["distances"]["linf"] <= p["bound"] * (1 + 1e-4) + 1e-6
    assert {c["level"] for c in manifest["conditions"]} == {0, 1, 2}


def digit_folder(root: Path, classes=(0, 3, 7)) -> Path:
    """scikit-learn digits, one per class folder named by the digit, as 8-bit RGB PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in classes:
        index = int(np.flatnonzero(digits.target == c)[0])
        grey = np.kron(digits.images[index] / 16 * 255, np.ones((4, 4))).astype(np.uint8)
        (root / str(c)).mkdir(parents=True)
        Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2)).save(root / str(c) / "a.png")
    return root


def test_label_items_from_class_folders_and_a_refused_class(tmp_path):
    images = digit_folder(tmp_path / "digits")
    assert folder_class_names(images) == ["0", "3", "7"]
    assert resolve_label_set(None, str(images)) == ("0", "3", "7")
    out = tmp_path / "out"
    manifest = generate(out, "--protocol", "label", "--images", str(images), "--label-set",
                        "digits", "--spec", "linf:bound=8/255,num_iterations=1",
                        "--sentinels", "1")
    assert manifest["label_set"] == [str(i) for i in range(10)]
    assert {(p["source_image"], p["class_name"]) for p in manifest["pairs"]} == {
        ("0-a-c0-32", "0"), ("3-a-c0-32", "3"), ("7-a-c0-32", "7")}
    assert sum(p["is_sentinel"] for p in manifest["pairs"]) == 1
    # A source whose true class is not in the label set: refused, nothing written.
    refused = tmp_path / "refused"
    with pytest.raises(EngineError, match=r"7-a-c0-32 \(class '7'\)"):
        from engine.generate import generate as run

        run(GenerateRequest(specs=("linf:bound=8/255,num_iterations=1",), out=str(refused),
                            images=str(images), classifier="resnet18:untrained",
                            lpips=("alexnet:untrained",), size=32, protocol="label",
                            label_set=("0", "3"), progress=False, device="cpu"))
    assert not refused.exists()
    assert main(["generate", "--out", str(refused), "--protocol", "label", "--images",
                 str(images), "--label-set", "0,3", "--spec", "linf:bound=8/255",
                 *COMMON]) == 2
    assert not refused.exists()


def test_label_sets_from_lists_files_and_names(tmp_path):
    assert resolve_label_set("cat, dog,bird") == ("cat", "dog", "bird")
    listed = tmp_path / "classes.txt"
    listed.write_text("# classes\ncat\n\ndog\n")
    assert resolve_label_set(str(listed)) == ("cat", "dog")
    names = imagenet100_class_names()
    assert len(names) == 100 and names[0] == "tench" and resolve_label_set("imagenet100") == (
        tuple(names))
    assert resolve_label_set("digits") == tuple("0123456789")
    assert resolve_label_set("dataset", "skimage") == tuple(SKIMAGE_CLASS_NAMES.values())
    for bad, message in (("cat,cat", "given twice"), ("cat,,dog", "not a class name")):
        with pytest.raises(EngineError, match=message):
            resolve_label_set(bad)
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(EngineError, match="no class sub-folders"):
        resolve_label_set(None, str(tmp_path / "flat"))


def test_imagenet_wordnet_folders_are_named_in_class_index_order(tmp_path):
    """1000 WordNet-ID class folders (ImageNet-1k's layout) get torchvision's class names by
    sorted ID; so ImageNet-100's classes (every 10th) are named as ``imagenet100`` names them."""
    from engine.datasets import imagenet100_classes, imagenet_category_names

    wnids = [f"n{7 * i + 1000:08d}" for i in range(1000)]
    for wnid in wnids:
        (tmp_path / wnid).mkdir()
        (tmp_path / wnid / "x.png").write_bytes(b"")  # only the names are read
    names = folder_class_names(tmp_path)
    assert names == imagenet_category_names() and names[0] == "tench"
    index = {w: i for i, w in enumerate(sorted(wnids))}
    assert [names[index[w]] for w in imagenet100_classes(wnids)] == imagenet100_class_names()


def test_default_2afc_pairs_differ_in_one_thing():
    specs = ("linf:bound=small", "linf:bound=large", "l2:bound=small", "l2:bound=large")
    request = GenerateRequest(specs=specs, protocol="2afc")
    assert request.triplet_pairs() == (
        ("linf:bound=small", "linf:bound=large"), ("linf:bound=small", "l2:bound=small"),
        ("linf:bound=large", "l2:bound=large"), ("l2:bound=small", "l2:bound=large"))


@pytest.mark.parametrize("changes, message", [
    (dict(protocol="nope"), "unknown protocol"),
    (dict(versus=(("linf:bound=small", "l2:bound=small"),)), "for --protocol 2afc"),
    (dict(protocol="2afc", catch=1), "catch pairs are JND"),
    (dict(protocol="label", label_set=("a", "a")), "given twice"),
    (dict(label_set=("a",)), "for --protocol label"),
    (dict(rating_shows="single"), "for --protocol rating"),
    (dict(protocol="rating", rating_shows="both"), "rating_shows must be"),
    (dict(protocol="2afc", specs=("linf:bound=small", "l2:bound=large")), "2AFC needs"),
    (dict(protocol="2afc", specs=("linf:bound=small", "l2:bound=small", "l2:bound=large"),
          versus=(("linf:bound=small", "l2:bound=small"),)), "in no 2AFC pair"),
    (dict(protocol="2afc", specs=("linf:bound=small", "linf:bound=2/255"),
          versus=(("linf:bound=small", "linf:bound=2/255"),)), "same condition"),
    (dict(protocol="2afc", versus=(("linf:bound=small", "linf:bound=medium"),)),
     "not one of the specs"),
], ids=lambda v: None if isinstance(v, dict) else v)
def test_bad_protocol_requests_are_clear_errors(changes, message):
    values = dict(specs=("linf:bound=small", "l2:bound=small"), classifier="resnet18:untrained",
                  lpips=("alexnet:untrained",), device="cpu")
    values.update(changes)
    with pytest.raises(EngineError, match=message):
        GenerateRequest(**values).check()


def test_versus_sides_take_each_bound_in_turn():
    from engine.__main__ import expand_versus

    pairs, levels = expand_versus([["linf", "l2"]], "small,0.5@mine", None)
    assert pairs == (("linf:bound=small", "l2:bound=small"),
                     ("linf:bound=0.5@mine", "l2:bound=0.5@mine")) and levels is None
    pairs, _ = expand_versus([["linf:bound=2/255", "linf"]], "small", None)
    assert pairs == (("linf:bound=2/255", "linf:bound=small"),)


@pytest.mark.slow
def test_two_ranks_give_the_same_2afc_manifest_as_one(folders, tmp_path):
    """Under torchrun the triplets are made on rank 0 from every rank's pairs: the same
    manifest and PNGs as one process."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc-per-node", "2", "-m", "engine", "generate", "--out", str(out),
                    "--protocol", "2afc", "--versus", LINF, L2, *COMMON], check=True, env=env,
                   cwd=root, timeout=600)
    assert read(out) == read(folders["2afc"])
    for rel in read(out)["files"]:
        assert (out / rel).read_bytes() == (folders["2afc"] / rel).read_bytes()
