"""Commands `evaluate report`, `evaluate stats`, `evaluate compare` and `evaluate real-vs-real`.

    python -m training.cli evaluate report --bundle models/demo --real phantoms:1024 --prior nih-boosted \\
        --auditor runs/demo/auditor --out reports/demo
    python -m training.cli evaluate stats --data nih:/data/nih --split test --size 256 --extractor xrv-densenet \\
        --weights xrv-densenet121-all.pt --out reference/nih-test-xrv.npz
    python -m training.cli evaluate compare reference/nih-test-xrv.npz generated-xrv.npz
    python -m training.cli evaluate real-vs-real --data nih:../shared/data/nih-sample --size 64 --bundle models/nih

Bad input exits 1 with one line on stderr that says what to fix; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.evaluate.features import EXTRACTORS

if TYPE_CHECKING:
    from training.evaluate.report import ReportSection


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="measure generated x-rays against real ones (FD, KID, PRDC, "
                                   "label distribution, LCO fidelity, diversity, TSTR) and write a report")
    commands = parser.add_subparsers(dest="evaluate_command", metavar="SUBCOMMAND", required=True)

    def extractor_options(command: argparse.ArgumentParser, repeat: bool) -> None:
        command.add_argument("--extractor", action="append" if repeat else "store", choices=EXTRACTORS,
                             help="feature network" + (" (repeatable; default: bundle and auditor)" if repeat else ""))
        command.add_argument("--bundle", help="model bundle directory (the bundle extractor, the generator)")
        command.add_argument("--auditor", help="trained classifier directory (the auditor extractor and judge)")
        command.add_argument("--weights", action="append", default=[], metavar="[EXTRACTOR=]PATH",
                             help="weights file of xrv-densenet or inception (never downloaded; docs/evaluation.md)")
        command.add_argument("--weights-sha256", help="expected sha256 of the weights file")
        command.add_argument("--prior", help="phantom prior of phantoms:N data (nih, balanced, nih-boosted)")
        command.add_argument("--no-progress", action="store_true")

    report = commands.add_parser("report", help="every measurement of a bundle, as an HTML + JSON report")
    extractor_options(report, repeat=True)
    report.add_argument("--real", required=True, help="real data spec (nih:PATH, phantoms:N, …)")
    report.add_argument("--real-split", default="test", help="held-out split of --real (default test)")
    report.add_argument("--train-data", help="the generator's training data spec, for the label prevalence")
    report.add_argument("--samples", type=int, default=512, help="unconditional samples (and most real images)")
    report.add_argument("--fidelity-images", type=int, default=16, help="LCO images per request (0: skip)")
    report.add_argument("--lco", action="append", default=[], metavar="KEY=VALUE", help="LCO option, e.g. steps=50")
    report.add_argument("--gan-run", help="GAN run directory: plots its Fréchet distance during training")
    report.add_argument("--archive", help="synthetic NIH-layout archive: runs TSTR against --real")
    report.add_argument("--tstr-preset", default="ci", help="classifier preset TSTR trains (default ci)")
    report.add_argument("--tstr-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of the TSTR classifier preset")
    report.add_argument("--reference-dir", help="folder of reference statistics, saved once and reused")
    report.add_argument("--section", action="append", default=[], metavar="JSON",
                        help="extra report section: a JSON file {title, summary, pictures: [PNG paths, relative to the "
                        "file], note}, such as the section.json of `training.evaluate.memorisation audit`")
    report.add_argument("--bootstrap", type=int, default=200)
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--out", required=True, help="report directory (must not exist)")
    report.set_defaults(handler=_report)

    stats = commands.add_parser("stats", help="save reference feature statistics (.npz) of a real data set")
    extractor_options(stats, repeat=False)
    stats.add_argument("--data", help="data spec (nih:PATH, phantoms:N, …); or --generated")
    stats.add_argument("--split", default="all")
    stats.add_argument("--size", type=int, help="side real images are read at")
    stats.add_argument("--limit", type=int, help="at most this many images")
    stats.add_argument("--generated", type=int, metavar="N", help="instead: N unconditional samples of --bundle")
    stats.add_argument("--out", required=True, help=".npz to write (must not exist)")
    stats.set_defaults(handler=_stats)

    compare = commands.add_parser("compare", help="FD, KID and PRDC between two saved feature statistics")
    compare.add_argument("real", help=".npz of the real set")
    compare.add_argument("fake", help=".npz of the generated set")
    compare.add_argument("--bootstrap", type=int, default=200)
    compare.set_defaults(handler=_compare)

    floor = commands.add_parser("real-vs-real", help="FD/KID/PRDC between two patient-disjoint halves of a real "
                                "set: the floor a generator is judged against")
    extractor_options(floor, repeat=True)
    floor.add_argument("--data", required=True)
    floor.add_argument("--size", type=int, required=True)
    floor.add_argument("--split", default="all", help="split to halve (default all; phantoms: train, val or test)")
    floor.add_argument("--bootstrap", type=int, default=200)
    floor.add_argument("--seed", type=int, default=0)
    floor.add_argument("--json", help="also write the results to this JSON file")
    floor.set_defaults(handler=_real_vs_real)


def _fail(message: str) -> int:
    print(f"evaluate: {message}", file=sys.stderr)
    return 1


def _weights(args: argparse.Namespace, names: list[str]) -> dict[str, str]:
    weights: dict[str, str] = {}
    for entry in args.weights:
        name, _, path = entry.rpartition("=")
        if name and name not in EXTRACTORS:
            raise ValueError(f"--weights {entry}: {name!r} is not an extractor ({', '.join(EXTRACTORS)})")
        for target in [name] if name else [n for n in names if n in ("xrv-densenet", "inception")]:
            weights[target] = path
    return weights


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {"prior": args.prior} if getattr(args, "prior", None) else {}


def _lco_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"--lco {pair}: write KEY=VALUE, e.g. steps=50")
        options[key] = json.loads(value) if value.replace(".", "", 1).lstrip("-").isdigit() else value
    return options


def _report(args: argparse.Namespace) -> int:
    from training.evaluate.suite import EvaluationPlan, evaluate_bundle

    try:
        if not args.bundle:
            raise ValueError("--bundle is required: the bundle to evaluate")
        if Path(args.out).exists():
            raise FileExistsError(f"report directory {args.out} exists; choose a new one")
        extractors = tuple(args.extractor or ("bundle", "auditor"))
        sections = [read_section(path) for path in args.section]
        plan = EvaluationPlan(bundle=args.bundle, real=args.real, real_split=args.real_split,
                              real_options=_options(args), train_data=args.train_data, samples=args.samples,
                              auditor=args.auditor, extractors=extractors, weights=_weights(args, list(extractors)),
                              fidelity_images=args.fidelity_images, lco_options=_lco_options(args.lco),
                              gan_run=args.gan_run, archive=args.archive, tstr_preset=args.tstr_preset,
                              tstr_overrides=tuple(args.tstr_set), reference_dir=args.reference_dir,
                              bootstrap=args.bootstrap, seed=args.seed, extra_sections=sections)
        page = evaluate_bundle(plan, args.out, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, RuntimeError) as error:
        return _fail(str(error))
    print(f"report written to {page}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from service.bundle import load_bundle
    from training.evaluate.features import extract, make_extractor
    from training.evaluate.images import generate_images, read_images
    from training.evaluate.statistics import save_statistics

    try:
        if Path(args.out).exists():
            raise FileExistsError(f"{args.out} exists; reference statistics are written once")
        if not args.extractor:
            raise ValueError(f"--extractor is required ({', '.join(EXTRACTORS)})")
        bundle = load_bundle(args.bundle) if args.bundle else None
        extractor = make_extractor(args.extractor, bundle=bundle, auditor=args.auditor,
                                   weights=_weights(args, [args.extractor]).get(args.extractor),
                                   expected_sha256=args.weights_sha256)
        if args.generated:
            if bundle is None:
                raise ValueError("--generated needs --bundle")
            images = generate_images(bundle, args.generated, progress=not args.no_progress)
        elif args.data and args.size:
            images = read_images(args.data, args.size, split=args.split, limit=args.limit,
                                 progress=not args.no_progress, **_options(args))
        else:
            raise ValueError("give --data SPEC with --size S (real images), or --generated N (samples of --bundle)")
        features = extract(extractor, images.images, progress=not args.no_progress, source=images.source)
        save_statistics(features, args.out)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        return _fail(str(error))
    print(f"{len(features)} images, {features.features.shape[1]}-d {extractor.name} features -> {args.out}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from training.evaluate.metrics import distribution_metrics
    from training.evaluate.statistics import load_statistics

    try:
        result = distribution_metrics(load_statistics(args.real), load_statistics(args.fake), bootstrap=args.bootstrap)
    except (ValueError, FileNotFoundError) as error:
        return _fail(str(error))
    print(json.dumps(result, indent=1, sort_keys=True))
    return 0


def _real_vs_real(args: argparse.Namespace) -> int:
    from service.bundle import load_bundle
    from training.evaluate.features import extract, make_extractor
    from training.evaluate.images import patient_halves, read_images
    from training.evaluate.metrics import distribution_metrics

    try:
        bundle = load_bundle(args.bundle) if args.bundle else None
        names = args.extractor or ["bundle", "auditor"]
        weights = _weights(args, names)
        extractors = [make_extractor(name, bundle=bundle, auditor=args.auditor, weights=weights.get(name),
                                     expected_sha256=args.weights_sha256) for name in names]
        images = read_images(args.data, args.size, split=args.split, seed=args.seed, progress=not args.no_progress,
                             **_options(args))
        first, second = patient_halves(images, args.seed)
        results = {}
        for extractor in extractors:
            a = extract(extractor, first.images, progress=not args.no_progress, source=first.source)
            b = extract(extractor, second.images, progress=not args.no_progress, source=second.source)
            results[extractor.name] = distribution_metrics(a, b, bootstrap=args.bootstrap, seed=args.seed,
                                                           progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return _fail(str(error))
    text = json.dumps(results, indent=1, sort_keys=True)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def read_section(path: str | Path) -> ReportSection:
    """An extra report section from a JSON file {title, summary, pictures: [PNGs relative to the file], note}.

    Raises ValueError naming the file when it is not such a document.
    """
    from training.evaluate.report import ReportSection

    path = Path(path)
    try:
        document = json.loads(path.read_text())
        return ReportSection(document["title"], document.get("summary", {}),
                             pictures=[path.parent / picture for picture in document.get("pictures", [])],
                             note=document.get("note", ""))
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a report section ({type(error).__name__}: {error}); "
                         "write {title, summary, pictures, note}") from None
