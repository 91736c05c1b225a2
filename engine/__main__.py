"""``python -m engine {generate,train,evaluate}`` — the engine's command line (no Django).

Every subcommand runs unchanged under ``torchrun --nproc-per-node N python -m engine ...``
(DistributedDataParallel for ``train``, sharded source images for ``generate``; ``evaluate``
runs on the main process). ``python -m engine SUBCOMMAND --help`` lists the options.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EngineError

#: Threat models a method trains against (left out of the unseen mean).
SEEN = {"standard": (), "pgd_linf": ("linf",), "pgd_l2": ("l2",), "trades": ("linf",),
        "pat_self": ("fast_lpa", "lpa", "ppgd"), "pat_alexnet": ("fast_lpa", "lpa", "ppgd"),
        "lagrangian": (), "perceptual_prior": (), "pag": (), "oaat": ("linf",)}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="attack source images and write PNG pairs + manifest")
    g.add_argument("--out", required=True, help="output folder (PNGs, manifest.json/csv)")
    g.add_argument("--spec", dest="specs", action="append",
                   help="attack spec, repeatable, e.g. linf:bound=4/255")
    g.add_argument("--bounds", help="comma-separated bounds applied to every --spec: named"
                   " (small,medium,large,cifar10), numeric or VALUE@LABEL (0.31@human_medium);"
                   " with --ladder: LOW,HIGH")
    g.add_argument("--ladder", type=int, metavar="N", help="N log-spaced bounds per --spec"
                   " (labels L0..L{N-1}, ladder levels) between --bounds LOW,HIGH (default:"
                   " half the named small to twice the named large bound)")
    g.add_argument("--images", default="skimage",
                   help="skimage, a folder, or torchvision:NAME[:ROOT]")
    g.add_argument("--classifier", default="resnet50",
                   help="ImageNet classifier spec (alexnet:untrained) or a training run folder")
    g.add_argument("--lpips", action="append", help="LPIPS network(s) to measure pairs with"
                   " (default: alexnet)")
    g.add_argument("--size", type=int, default=224, help="crop side in pixels")
    g.add_argument("--crops-per-image", type=int, default=1)
    g.add_argument("--max-images", type=int)
    g.add_argument("--sentinels", type=int, help="sentinel pairs (default: one per image)")
    g.add_argument("--catch", type=int, default=0, help="catch pairs")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--device", default="auto")
    g.add_argument("--autocast", choices=["bf16"], help="bf16 autocast for the attacks (GPU)")
    g.add_argument("--no-progress", action="store_true")
    add_protocol_arguments(g)

    t = sub.add_parser("train", help="train a defense (see engine.objectives for methods)")
    t.add_argument("--out", required=True, help="run folder (resumed if it has a checkpoint)")
    t.add_argument("--preset", help="the papers' optimiser settings: " + ", ".join(
        __import__("engine.train", fromlist=["PRESETS"]).PRESETS))
    t.add_argument("--dataset", default="digits",
                   help="digits, cifar10, imagenet100 or folder:PATH")
    t.add_argument("--data-root", help="where datasets are (default $PERCEPTLAB_DATA or"
                   " var/data)")
    t.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    t.add_argument("--image-size", type=int)
    t.add_argument("--arch", default="tiny", help="resnet18, resnet50, resnet18_imagenet,"
                   " resnet50_imagenet, wrn28_10, wrn34_10, alexnet_cifar, tiny")
    t.add_argument("--method", default="standard", help="defense; --list-methods shows them")
    t.add_argument("--set", dest="settings", action="append", metavar="KEY=VALUE",
                   help="method parameter, repeatable (e.g. --set bound=8/255); lists of"
                   " attack specs are '|'-separated")
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("momentum", float),
                       ("weight-decay", float), ("gamma", float), ("seed", int),
                       ("num-workers", int), ("checkpoint-every", int), ("log-every", int),
                       ("eval-limit", int), ("stop-after", int)):
        t.add_argument(f"--{name}", type=kind)
    t.add_argument("--schedule", choices=["multistep", "cosine", "constant"])
    t.add_argument("--milestones", help="comma-separated epochs of the ×gamma drops")
    t.add_argument("--device", default="auto")
    t.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto")
    t.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto")
    t.add_argument("--no-augment", action="store_true")
    t.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint"
                   " exists")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--list-methods", action="store_true", help="print the methods and exit")

    e = sub.add_parser("evaluate", help="accuracy of trained models under attacks, as tables")
    e.add_argument("--run", dest="runs", action="append", required=True,
                   help="training run folder (or model .pt), repeatable: one table row each")
    e.add_argument("--out", required=True, help="folder for results.{csv,md,json} etc.")
    e.add_argument("--spec", dest="specs", action="append", default=[],
                   help="attack spec, repeatable (named bounds allowed: bound=cifar10)")
    e.add_argument("--autoattack", action="append", default=[], metavar="NORM:EPS",
                   help="AutoAttack standard ensemble, e.g. linf:8/255 or l2:1.0")
    e.add_argument("--autoattack-version", choices=["standard", "fast"], default="standard")
    e.add_argument("--calibrated", help="JSON {threat_model: {label: bound}} from calibrate"
                   " (perceptibility-matched table + curve)")
    e.add_argument("--calibrated-params", action="append", default=[],
                   metavar="THREAT=PARAMS", help="extra spec parameters per threat model for"
                   " the calibrated bounds, e.g. linf=num_iterations=40")
    e.add_argument("--sanity", action="store_true", help="gradient-masking sanity checks")
    e.add_argument("--logit-distances", type=float, metavar="XI", help="also measure the"
                   " perceptual prior's d_per / d_intra / d_inter with sign noise of L∞ size XI"
                   " ([0, 1] pixels, e.g. 8/255 = 0.0314)")
    e.add_argument("--dataset", help="default: the dataset the (first) run trained on")
    e.add_argument("--data-root")
    e.add_argument("--image-size", type=int)
    e.add_argument("--limit", type=int, default=500, help="test images (first N)")
    e.add_argument("--batch-size", type=int, default=100)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--device", default="auto")
    e.add_argument("--no-progress", action="store_true")
    return parser


def expand_conditions(specs: list[str], bounds: str | list[str] | None, ladder: int | None
                      ) -> tuple[tuple[str, ...], dict[str, int] | None]:
    """``(specs, levels)`` of ``--spec``/``--bounds``/``--ladder`` (shared with
    ``manage.py generate_pairs``): :func:`engine.attacks.spec.expand_specs` or
    :func:`~engine.attacks.spec.ladder_specs`."""
    from .attacks.spec import expand_specs, ladder_specs

    if isinstance(bounds, str):
        bounds = [b.strip() for b in bounds.split(",") if b.strip()]
    if ladder is not None:
        return ladder_specs(specs, bounds, ladder)
    return expand_specs(specs, bounds), None


def add_protocol_arguments(parser) -> None:
    """The protocol options of ``generate`` (shared with ``manage.py generate_pairs``)."""
    parser.add_argument(
        "--protocol", choices=["jnd", "2afc", "rating", "label"], default="jnd",
        help="what the items are for: jnd pairs (default), 2afc triplets (reference, A, B),"
        " rating items, label items (see README 'Generating pairs')")
    parser.add_argument(
        "--versus", nargs=2, action="append", metavar=("SPEC_A", "SPEC_B"),
        help="2afc: one triplet per source with copy A under SPEC_A and copy B under SPEC_B,"
        " repeatable, e.g. --versus linf:bound=small l2:bound=small; sides without bound="
        " take each --bounds in turn (A and B at the same bound label). Default: every two"
        " --spec conditions that differ in one thing (threat model or bound)")
    parser.add_argument(
        "--rating-shows", choices=["pair", "single"], default="pair",
        help="rating: rate a pair's difference (natural then perturbed; DMOS) or one image's"
        " quality (the perturbed image alone; MOS)")
    parser.add_argument(
        "--label-set", metavar="NAMES",
        help="label: the class names offered as answers: a,b,c; a text file (one a line);"
        " imagenet100; digits (0..9); or dataset (default: the --images classes: a folder's"
        " class sub-folders, a torchvision dataset's classes, the scikit-image photographs'"
        " documented names). A source whose true class is not in it is refused")


def expand_versus(versus: list[list[str]] | None, bounds: str | list[str] | None,
                  ladder: int | None) -> tuple[tuple[tuple[str, str], ...] | None,
                                               dict[str, int] | None]:
    """``(pairs, levels)`` of ``--versus`` with ``--bounds``/``--ladder``: a side that sets
    ``bound=`` itself is kept; the others take each bound (or ladder level) in turn, so A
    and B of a triplet share the bound label (``--versus linf l2 --bounds small,large``:
    linf small vs l2 small, linf large vs l2 large)."""
    from .attacks.spec import has_param

    if not versus:
        return None, None
    out: list[tuple[str, str]] = []
    levels: dict[str, int] = {}
    for a, b in versus:
        sides = []
        for side in (a, b):
            if (bounds is None and ladder is None) or has_param(side, "bound"):
                sides.append(None)
                continue
            specs, side_levels = expand_conditions([side], bounds, ladder)
            sides.append(list(specs))
            levels.update(side_levels or {})
        n = max((len(x) for x in sides if x is not None), default=1)
        a_list, b_list = (x if x is not None else [side] * n
                          for x, side in zip(sides, (a, b), strict=True))
        out += list(zip(a_list, b_list, strict=True))
    return tuple(out), levels or None


def protocol_conditions(specs: tuple[str, ...], levels: dict[str, int] | None,
                        versus: tuple[tuple[str, str], ...] | None,
                        versus_levels: dict[str, int] | None
                        ) -> tuple[tuple[str, ...], dict[str, int] | None]:
    """The request's specs: ``specs`` and then every ``versus`` side not among them (as
    given, once), with their ladder levels merged."""
    out = list(specs)
    for pair in versus or ():
        out += [s for s in pair if s not in out]
    merged = {**(levels or {}), **(versus_levels or {})}
    return tuple(out), merged or None


def cmd_generate(args) -> int:
    from .datasets import resolve_label_set
    from .generate import GenerateRequest, generate

    specs, levels = expand_conditions(args.specs or [], args.bounds, args.ladder)
    versus, versus_levels = expand_versus(args.versus, args.bounds, args.ladder)
    specs, levels = protocol_conditions(specs, levels, versus, versus_levels)
    label_set = (resolve_label_set(args.label_set, args.images)
                 if args.label_set is not None else None)
    manifest = generate(GenerateRequest(
        specs=specs, levels=levels, out=args.out, images=args.images,
        classifier=args.classifier, lpips=tuple(args.lpips or ["alexnet"]), size=args.size,
        crops_per_image=args.crops_per_image, max_images=args.max_images,
        sentinels=args.sentinels, catch=args.catch, seed=args.seed,
        batch_size=args.batch_size, device=args.device, autocast=args.autocast,
        progress=not args.no_progress, protocol=args.protocol, versus=versus,
        rating_shows=args.rating_shows, label_set=label_set))
    if manifest is not None:
        items = "pairs" if manifest.protocol == "jnd" else f"{manifest.protocol} items"
        print(f"wrote {len(manifest.pairs)} {items} to {args.out}/manifest.json"
              f" ({manifest.generator['code_version']})")
        if manifest.generator["untrained"]:
            print("UNTRAINED networks used (recorded in the manifest): "
                  + ", ".join(manifest.generator["untrained"]))
    return 0


def cmd_train(args) -> int:
    from .objectives import available_methods, parse_settings
    from .train import TrainConfig, train

    if args.list_methods:
        for name, summary in available_methods().items():
            print(f"{name:18s} {summary}")
        return 0
    overrides = {k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "momentum": args.momentum, "weight_decay": args.weight_decay, "gamma": args.gamma,
        "seed": args.seed, "num_workers": args.num_workers,
        "checkpoint_every": args.checkpoint_every, "log_every": args.log_every,
        "eval_limit": args.eval_limit, "stop_after": args.stop_after,
        "schedule": args.schedule, "image_size": args.image_size,
        "data_root": args.data_root}.items() if v is not None}
    if args.milestones is not None:
        overrides["milestones"] = tuple(int(m) for m in args.milestones.split(",") if m.strip())
    common = dict(out=args.out, dataset=args.dataset, download=args.download, arch=args.arch,
                  method=args.method, method_params=parse_settings(args.settings),
                  device=args.device, amp=args.amp, channels_last=args.channels_last,
                  augment=not args.no_augment, resume=not args.no_resume,
                  progress=not args.no_progress)
    config = (TrainConfig.from_preset(args.preset, **common, **overrides) if args.preset
              else TrainConfig(**common, **overrides))
    out = train(config)
    print(f"run folder: {out}")
    return 0


def run_evaluation(args) -> dict:
    """The evaluate subcommand's work; returns what it writes to results.json."""
    import torch

    from .datasets import load_dataset
    from .distributed import resolve_device
    from .evaluate import (
        SANITY_NOTE,
        evaluate_model,
        load_calibrated_bounds,
        perceptibility_matched,
        sanity_checks,
        write_perceptibility,
        write_table,
    )
    from .train import _model_file, load_model

    if not args.specs and not args.autoattack and not args.calibrated:
        raise EngineError("nothing to evaluate: give --spec, --autoattack or --calibrated")
    device = resolve_device(args.device)
    out = Path(args.out)
    infos = []
    for run in args.runs:
        blob = torch.load(_model_file(run), map_location="cpu", weights_only=False)
        infos.append(blob["model_info"])
    dataset = args.dataset or infos[0]["dataset"]
    bundle = load_dataset(dataset, args.data_root, image_size=args.image_size)
    label = bundle.label
    rows, evaluations, sanity, perceptibility, distances = [], {}, {}, {}, []
    column_info: dict[str, dict] = {}
    calibrated = load_calibrated_bounds(args.calibrated) if args.calibrated else None
    extra = dict(p.split("=", 1) for p in args.calibrated_params)
    for run, info in zip(args.runs, infos, strict=True):
        model = load_model(run, device)
        name = f"{info['method']} ({Path(run).name})"
        ev = evaluate_model(model, bundle.test, args.specs, name=name, dataset_label=label,
                            limit=args.limit, batch_size=args.batch_size, seed=args.seed,
                            device=device, autoattack=args.autoattack,
                            autoattack_version=args.autoattack_version,
                            seen=SEEN.get(info["method"], ()), progress=not args.no_progress)
        rows.append(ev.row())
        evaluations[name] = ev.specs
        column_info[name] = ev.column_info()
        if args.logit_distances is not None:
            from .objectives import logit_distances

            n = min(args.limit, len(bundle.test))
            images = torch.stack([bundle.test[i][0] for i in range(n)]).to(device)
            labels = torch.tensor([int(bundle.test[i][1]) for i in range(n)], device=device)
            distances.append({"model": name, "xi": args.logit_distances, **logit_distances(
                model, images, labels, xi=args.logit_distances)})
        if args.sanity:
            sanity[name] = sanity_checks(model, bundle.test, args.specs[:3],
                                         limit=min(args.limit, 200), device=device)
        if calibrated:
            perceptibility[name] = perceptibility_matched(
                model, bundle.test, calibrated, attack_params=extra, limit=args.limit,
                batch_size=args.batch_size, seed=args.seed, device=device)
    title = f"Robust accuracy — {label}"
    write_table(rows, out, "results", title=title, notes=[
        f"Dataset: {label}. First {args.limit} test images.",
        "Columns: " + "; ".join(f"`{k}` = {v}" for k, v in next(iter(evaluations.values()))
                                .items())])
    if distances:
        write_table(distances, out, "logit_distances", percent=False,
                    title=f"Logit distances (perceptual prior, section 3.1) — {label}",
                    notes=["Mean L2 distance between logits: d_per of an image and its noisy"
                           " copy x + xi·sign(N(0, I)); d_intra of two images of one class;"
                           " d_inter of two classes. Lower d_per / d_intra: more"
                           " perceptual-prior-like."])
    if sanity:
        sanity_rows = [{"model": m, **c} for m, checks in sanity.items() for c in checks]
        write_table(sanity_rows, out, "sanity", title=f"Gradient-masking sanity checks — {label}",
                    notes=[SANITY_NOTE], percent=False)
    if perceptibility:
        note = json.loads(Path(args.calibrated).read_text()).get("note", "")
        write_perceptibility(perceptibility, out,
                             title=f"Perceptibility-matched robustness — {label}",
                             notes=[f"Calibrated bounds: {args.calibrated}. {note}"])
    result = {"dataset": dataset, "dataset_label": label, "limit": args.limit,
              "rows": rows, "columns": evaluations, "column_info": column_info,
              "sanity": sanity,
              "perceptibility": perceptibility, "calibrated_bounds": calibrated,
              "logit_distances": distances,
              "untrained": sorted({n for info in column_info.values() for c in info.values()
                                   for n in c.get("untrained", [])}),
              "runs": [str(r) for r in args.runs]}
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def cmd_evaluate(args) -> int:
    import os

    from .distributed import DistInfo  # noqa: F401  (evaluate runs on one process)

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    result = run_evaluation(args)
    print(f"wrote {args.out}/results.md")
    if result["untrained"]:
        print("UNTRAINED networks used by the attacks (recorded in results.json): "
              + ", ".join(result["untrained"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "train": cmd_train,
                "evaluate": cmd_evaluate}[args.command](args)
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
