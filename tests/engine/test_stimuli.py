"""engine.data and engine.stimuli: real photographs in, lossless PNG pairs + manifest out."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity
from torch import nn

from engine.data import BUNDLED_PHOTOGRAPHS, load_sources
from engine.distances import build_lpips
from engine.errors import EngineError
from engine.models import ImageClassifier
from engine.stimuli import generate_stimuli

SPECS = ["linf:bound=8/255,num_iterations=3", "l2:bound=1.0,num_iterations=3"]


def tiny_classifier(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return ImageClassifier(net).eval()


def png_chunks(path) -> list[str]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append(data[pos + 4 : pos + 8].decode("ascii"))
        pos += 12 + length
    return chunks


def read_png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB"
        return np.asarray(img)


@pytest.fixture(scope="module")
def sources():
    return load_sources("skimage", size=64, crops_per_image=1, max_images=3, seed=0)


@pytest.fixture(scope="module")
def generated(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("stimuli")
    torch.manual_seed(0)
    lpips = {"alexnet": build_lpips("alexnet:untrained")}
    manifest = generate_stimuli(
        sources,
        SPECS,
        tiny_classifier(),
        out,
        lpips_models=lpips,
        seed=7,
        batch_size=2,
        progress=False,
    )
    return out, manifest


def test_bundled_photographs_are_cropped_reproducibly():
    a = load_sources("skimage", size=48, crops_per_image=2, seed=3)
    b = load_sources("skimage", size=48, crops_per_image=2, seed=3)
    c = load_sources("skimage", size=48, crops_per_image=2, seed=4)
    assert len(a) == 2 * len(BUNDLED_PHOTOGRAPHS)
    assert [s.id for s in a] == [s.id for s in b]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b, strict=True))
    assert all(s.pixels.shape == (48, 48, 3) and s.pixels.dtype == np.uint8 for s in a)
    # crop 0 is the centred square and does not depend on the seed; random crops do
    assert np.array_equal(a[0].pixels, c[0].pixels)
    assert not all(
        np.array_equal(x.pixels, y.pixels) for x, y in zip(a[1::2], c[1::2], strict=True)
    )


def test_image_folder_with_classes(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    loaded = load_sources(str(tmp_path), size=32)
    assert [s.dataset_label for s in loaded] == [0, 0, 1, 1]
    assert [s.id for s in loaded] == ["cat-0-c0-32", "cat-1-c0-32", "dog-0-c0-32", "dog-1-c0-32"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "contains no images"),
        (lambda d: (d.mkdir(), (d / "bad.png").write_bytes(b"not a png at all")), "bad.png"),
        (
            lambda d: (d.mkdir(), Image.new("L", (20, 20)).save(d / "gray.png")),
            "not an RGB image",
        ),
        (
            lambda d: (d.mkdir(), Image.new("RGBA", (20, 20)).save(d / "alpha.png")),
            "'RGBA'",
        ),
    ],
    ids=["missing", "empty", "corrupt", "grayscale", "rgba"],
)
def test_bad_image_folders_name_the_problem(tmp_path, make, message):
    folder = tmp_path / "images"
    make(folder)
    with pytest.raises(EngineError, match=message):
        load_sources(str(folder), size=32)


def test_pairs_are_lossless_pngs_without_metadata(generated, sources):
    out, manifest = generated
    assert len(manifest.pairs) == len(SPECS) * len(sources) + len(sources)
    for record in manifest.pairs:
        for rel in (record.natural_path, record.other_path):
            assert png_chunks(out / rel) == ["IHDR", "IDAT", "IEND"]
    natural = {s.id: s.pixels for s in sources}
    for record in manifest.pairs:
        assert np.array_equal(read_png(out / record.natural_path), natural[record.source_image])


def test_manifest_distances_match_the_stored_files(generated):
    out, manifest = generated
    for record in manifest.pairs:
        a = read_png(out / record.natural_path).astype(np.float64) / 255
        b = read_png(out / record.other_path).astype(np.float64) / 255
        assert record.distances["linf"] == pytest.approx(np.abs(a - b).max(), abs=1e-6)
        assert record.distances["l2"] == pytest.approx(
            np.sqrt(((a - b) ** 2).sum()), rel=1e-5, abs=1e-6
        )
        oracle = structural_similarity(
            a,
            b,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
        )
        assert record.distances["ssim"] == pytest.approx(oracle, abs=1e-4)
        assert "lpips_alexnet" in record.distances


def test_bounds_sentinels_and_success(generated):
    _, manifest = generated
    for record in manifest.pairs:
        if record.is_sentinel:
            assert record.natural_path == record.other_path
            assert record.condition is None and record.attack_success is None
            assert record.distances["l2"] == 0 and record.distances["lpips_alexnet"] == 0
        else:
            assert record.within_bound is True
            assert record.attack_success == (record.adversarial_label != record.label)
            assert record.distances["l2"] > 0
        if record.threat_model == "linf":
            assert record.distances["linf"] <= 8 / 255 + 1e-6
    assert manifest.generator["classifier"] == "Sequential"
    assert manifest.generator["lpips_models"]["alexnet"]["lpips_weights"] == "untrained"
    assert json.loads((generated[0] / "manifest.json").read_text())["generator"]["seed"] == 7


def test_deterministic_for_a_seed(generated, sources, tmp_path):
    out, _ = generated
    torch.manual_seed(0)
    lpips = {"alexnet": build_lpips("alexnet:untrained")}
    generate_stimuli(
        sources,
        SPECS,
        tiny_classifier(),
        tmp_path,
        lpips_models=lpips,
        seed=7,
        batch_size=2,
        progress=False,
    )
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    second = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert first == second
    for rel in first:
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


@pytest.mark.parametrize(
    "specs, message",
    [
        (["nosuchattack:bound=1"], "nosuchattack"),
        (["linf:bound=8/255,num_iterations"], "num_iterations"),
        (["linf:bound=-1"], "negative|>= 0|non-negative"),
        (["linf:bound=8/255", "linf:bound=8/255"], "given twice"),
        ([], "at least one"),
    ],
)
def test_bad_specs_write_nothing(sources, tmp_path, specs, message):
    out = tmp_path / "out"
    with pytest.raises(EngineError, match=message):
        generate_stimuli(sources, specs, tiny_classifier(), out, progress=False)
    assert not out.exists()


def test_catch_pairs_show_two_different_photographs(sources, tmp_path):
    manifest = generate_stimuli(
        sources, SPECS[:1], tiny_classifier(), tmp_path, sentinels=0, catch=2, progress=False
    )
    catch = [p for p in manifest.pairs if p.is_catch]
    assert len(catch) == 2 and not any(p.is_sentinel for p in manifest.pairs)
    for record in catch:
        assert record.condition is None and record.natural_path != record.other_path
        assert record.distances["l2"] > 1.0  # different photographs, not a perturbation
    with pytest.raises(EngineError, match="catch"):
        generate_stimuli(sources, SPECS[:1], tiny_classifier(), tmp_path / "x", catch=9,
                         progress=False)


def test_fit_stored_brings_8bit_images_inside_the_bound():
    import types

    from engine.stimuli import fit_stored, from_uint8

    rng = np.random.default_rng(0)
    natural_u8 = rng.integers(60, 200, size=(3, 8, 8, 3), dtype=np.uint8)
    moved = natural_u8.astype(np.int16) + rng.integers(-40, 40, size=natural_u8.shape)
    adversarial_u8 = np.clip(moved, 0, 255).astype(np.uint8)
    adversarial_u8[2] = natural_u8[2]  # already inside: must stay as it is
    natural = from_uint8(natural_u8)

    def l2(a, b, model=None):
        return (a - b).flatten(1).norm(dim=1)

    bound = 0.5 * float(l2(natural[:1], from_uint8(adversarial_u8[:1]))[0])
    attack = types.SimpleNamespace(bound=bound, perturbation_size=l2)
    fitted = fit_stored(attack, natural_u8, natural, adversarial_u8, None, torch.device("cpu"))
    sizes = l2(natural, from_uint8(fitted))
    assert bool((sizes <= bound * (1 + 1e-4)).all()), sizes
    assert float(sizes[0]) > 0.8 * bound  # shrunk, not thrown away
    assert np.array_equal(fitted[2], adversarial_u8[2])
