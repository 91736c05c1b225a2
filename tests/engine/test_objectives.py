"""Each defense moves the right metric the right way vs standard training (digits, tiny CNN).

Orderings, not exact numbers: a few hundred SGD steps at 16 px on scikit-learn digits.
"""

from __future__ import annotations

import pytest
import torch

from engine.datasets import load_dataset
from engine.errors import EngineError
from engine.evaluate import evaluate_model
from engine.objectives import (
    available_methods,
    build_method,
    logit_distances,
    parse_settings,
)
from engine.train import TrainConfig, load_model, train

EPOCHS = 8  # 8 × 22 = 176 steps of 64 images
LINF = "linf:bound=0.05,num_iterations=10"
L2 = "l2:bound=1.0,num_iterations=10"


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=16)


def _train(tmp_path_factory, digits, method, params=None, epochs=EPOCHS):
    out = tmp_path_factory.mktemp(method)
    config = TrainConfig(out=str(out), method=method, method_params=params or {},
                         epochs=epochs, milestones=(epochs - 1,), progress=False, log_every=50)
    return load_model(train(config, digits))


def _acc(model, digits, spec):
    ev = evaluate_model(model, digits.test, [spec], limit=200, progress=False)
    return ev.accuracy(next(iter(ev.correct)))


@pytest.fixture(scope="module")
def standard(tmp_path_factory, digits):
    return _train(tmp_path_factory, digits, "standard")


def test_standard_training_learns(standard, digits):
    ev = evaluate_model(standard, digits.test, [], limit=200, progress=False)
    assert float(ev.clean.float().mean()) > 0.8


@pytest.mark.slow
def test_pgd_at_raises_accuracy_under_pgd(tmp_path_factory, digits, standard):
    robust = _train(tmp_path_factory, digits, "pgd_linf",
                    {"bound": 0.05, "num_iterations": 5, "step_size": 0.02})
    assert _acc(robust, digits, LINF) > _acc(standard, digits, LINF) + 0.1


@pytest.mark.slow
def test_pat_raises_accuracy_under_pgd(tmp_path_factory, digits, standard):
    robust = _train(tmp_path_factory, digits, "pat_self", {"bound": 0.5, "num_iterations": 5})
    assert _acc(robust, digits, LINF) > _acc(standard, digits, LINF) + 0.03


@pytest.mark.slow
def test_perceptual_prior_lowers_d_per(tmp_path_factory, digits, standard):
    prior = _train(tmp_path_factory, digits, "perceptual_prior", {"xi": 0.1, "lam": 1.0})
    images = torch.stack([digits.test[i][0] for i in range(200)])
    labels = torch.tensor([int(digits.test[i][1]) for i in range(200)])
    before = logit_distances(standard, images, labels, xi=0.1)
    after = logit_distances(prior, images, labels, xi=0.1)
    assert after["d_per_over_d_intra"] < before["d_per_over_d_intra"]
    assert after["d_per"] < before["d_per"]


@pytest.mark.slow
def test_pag_raises_l2_robustness(tmp_path_factory, digits):
    # PAG costs one double-backward per class: 4 epochs, against standard training as long
    short = _train(tmp_path_factory, digits, "standard", epochs=4)
    pag = _train(tmp_path_factory, digits, "pag", {"target": "class_mean", "lam": 0.4},
                 epochs=4)
    assert _acc(pag, digits, L2) > _acc(short, digits, L2) + 0.05


def test_every_method_takes_a_step(digits):
    """Every method builds, binds and returns a finite differentiable loss."""
    from engine.architectures import build_architecture
    from engine.objectives import StepContext

    images = torch.stack([digits.train[i][0] for i in range(8)])
    labels = torch.tensor([int(digits.train[i][1]) for i in range(8)])
    quick = {"multi_random": {"attacks": "linf:bound=0.1,num_iterations=2|l2:bound=1,"
                                         "num_iterations=2"},
             "multi_average": {"attacks": "linf:bound=0.1,num_iterations=2|l2:bound=1,"
                                          "num_iterations=2"},
             "multi_max": {"attacks": "linf:bound=0.1,num_iterations=2|l2:bound=1,"
                                      "num_iterations=2"}}
    for name in available_methods():
        torch.manual_seed(0)
        net = build_architecture("tiny")
        method = build_method(name, quick.get(name, {}))
        method.bind(net, digits)
        for progress, step in ((0.0, 0), (0.95, 0), (0.95, 1)):  # OA-AT: each phase
            ctx = StepContext(net=net, generator=torch.Generator().manual_seed(0),
                              progress=progress, step=step)
            loss, metrics = method.loss(net, images, labels, ctx)
            assert torch.isfinite(loss), name
            loss.backward()
            method.before_optimizer_step(net)
            assert all(p.grad is not None for p in net.parameters()), name
            net.zero_grad()
            if name != "oaat":
                break


def test_oaat_schedule_and_awp_restores_weights(digits):
    from engine.architectures import build_architecture
    from engine.objectives import StepContext

    method = build_method("oaat", {})
    assert method.epsilon(0.1) == pytest.approx(4 / 255)
    assert method.epsilon(0.999) == pytest.approx(16 / 255, rel=0.01)
    assert method.epsilon(0.5) < method.epsilon(0.8)
    net = build_architecture("tiny")
    method.bind(net, digits)
    before = [p.detach().clone() for p in net.parameters()]
    images = torch.stack([digits.train[i][0] for i in range(4)])
    labels = torch.tensor([int(digits.train[i][1]) for i in range(4)])
    ctx = StepContext(net=net, generator=torch.Generator().manual_seed(0), progress=0.9)
    loss, _ = method.loss(net, images, labels, ctx)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    loss.backward()
    method.before_optimizer_step(net)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(before, net.parameters(),
                                                               strict=True))


def test_bad_method_input_is_a_clear_error():
    with pytest.raises(EngineError, match="unknown method 'nope'"):
        build_method("nope")
    with pytest.raises(EngineError, match="unknown parameter.*valid: bound"):
        build_method("pgd_linf", {"radius": 1})
    with pytest.raises(EngineError, match="bad value 'x'"):
        build_method("pgd_linf", {"bound": "x"})
    with pytest.raises(EngineError, match="unknown PAG target"):
        build_method("pag", {"target": "mean"})
    with pytest.raises(EngineError, match="key=value"):
        parse_settings(["bound"])
    assert build_method("pgd_linf", parse_settings(["bound=8/255"])).bound == pytest.approx(
        8 / 255)


def test_pag_targets_point_at_class_representatives(tmp_path, digits):
    """One Image / Class Mean / NN give r_t − x; RIGD uses a teacher's input gradients."""
    from engine.architectures import build_architecture
    from engine.objectives import StepContext

    images = torch.stack([digits.train[i][0] for i in range(6)])
    labels = torch.tensor([int(digits.train[i][1]) for i in range(6)])
    net = build_architecture("tiny")
    for target in ("one_image", "class_mean", "nearest_neighbour"):
        method = build_method("pag", {"target": target})
        method.bind(net, digits)
        goals = method.targets(images)
        assert goals.shape == (10, *images.shape)
        if target == "nearest_neighbour":  # the nearest image of each class is in the pool
            own = goals[labels, torch.arange(6)]
            assert own.flatten(1).norm(dim=1).max() < images.flatten(1).norm(dim=1).min()
    teacher = train(TrainConfig(out=str(tmp_path / "teacher"), epochs=1, stop_after=2,
                                image_size=16, progress=False), digits)
    rigd = build_method("pag", {"target": "rigd", "teacher": str(teacher)})
    rigd.bind(net, digits)
    loss, metrics = rigd.loss(net, images, labels, StepContext(net=net,
                                                               generator=torch.Generator()))
    assert torch.isfinite(loss) and -1 <= metrics["cosine"] <= 1
    with pytest.raises(EngineError, match="rigd needs teacher"):
        build_method("pag", {"target": "rigd"})
