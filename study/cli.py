"""``python -m study``: create a study, serve it, close it, write its report.

Every failure the user can fix is one line on stderr and exit code 2; nothing is stored unless the
whole study is (one transaction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_DATABASE = "sqlite:///study.db"


def _database(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=DEFAULT_DATABASE,
                        help=f"SQLAlchemy URL of the study database (default {DEFAULT_DATABASE})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    create = commands.add_parser("create", help="pick the images, encode them, store the study and print links")
    _database(create)
    create.add_argument("--name", required=True, help="study name in the links: lower-case letters, digits, '-'")
    create.add_argument("--title", help="shown to readers (default: the name)")
    create.add_argument("--real", required=True, help="real images: nih:PATH, chexpert:PATH or folder:PATH")
    create.add_argument("--synthetic", required=True, help="synthetic images: archive:DIR or bundle:DIR")
    create.add_argument("--cases", type=int, required=True, help="number of cases every reader reads")
    create.add_argument("--synthetic-fraction", type=float, default=0.5, help="share of synthetic cases (0.5)")
    create.add_argument("--readers", required=True, help="comma-separated reader names")
    create.add_argument("--seed", type=int, default=0, help="seed of the image choice and the case orders")
    create.add_argument("--no-findings", action="store_true", help="do not ask which findings are present")
    create.add_argument("--prior", default="nih", help="label prior for bundle:… images (service.prior)")
    create.add_argument("--lco", default="{}", help="LCO options for bundle:… images, as JSON")
    create.add_argument("--base-url", default="http://127.0.0.1:8020", help="where the app will be served")
    create.add_argument("--links", type=Path, help="also write the links as JSON to this file")

    serve = commands.add_parser("serve", help="serve the reader and admin app with uvicorn")
    _database(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8020)

    close = commands.add_parser("close", help="stop taking answers")
    _database(close)
    close.add_argument("--name", required=True)

    report = commands.add_parser("report", help="write answers.csv, statistics.csv and report.html")
    _database(report)
    report.add_argument("--name", required=True)
    report.add_argument("--out", type=Path, required=True, help="directory for the three files")
    report.add_argument("--note", default="", help="a line shown at the top of the report")

    migrate = commands.add_parser("migrate", help="create or upgrade the database schema (Alembic)")
    _database(migrate)
    return parser


class UsageError(Exception):
    pass


def _find(sessions, name: str):
    from study.storage import Study

    session = sessions()
    study = session.query(Study).filter_by(name=name).one_or_none()
    if study is None:
        raise UsageError(f"there is no study named {name!r} in this database")
    return session, study


def run(args: argparse.Namespace) -> int:
    from study.storage import migrate, session_factory

    if args.command == "migrate":
        migrate(args.db)
        return 0
    if args.command == "serve":
        import uvicorn

        from service.processes import check_port_free
        from study.app import create_app

        check_port_free(args.host, args.port, "choose another with --port")
        migrate(args.db)
        uvicorn.run(create_app(args.db), host=args.host, port=args.port)
        return 0
    if args.command == "create":
        from study.create import create_study, gather_cases

        try:
            lco = json.loads(args.lco)
        except ValueError:
            raise UsageError(f"--lco must be a JSON object, got {args.lco!r}") from None
        migrate(args.db)
        cases, resolution = gather_cases(args.real, args.synthetic, args.cases, args.synthetic_fraction, args.seed,
                                         args.prior, lco)
        setup = {"real": args.real, "synthetic": args.synthetic, "synthetic_fraction": args.synthetic_fraction,
                 "prior": args.prior, "lco": lco}
        links = create_study(session_factory(args.db), args.name, args.title or args.name, cases,
                             args.readers.split(","), args.seed, resolution, not args.no_findings, setup)
        urls = links.urls(args.base_url)
        if args.links:
            args.links.write_text(json.dumps(urls, indent=2) + "\n")
        for who, url in urls.items():
            print(f"{who}\t{url}")
        return 0
    sessions = session_factory(args.db)
    session, study = _find(sessions, args.name)
    with session:
        if args.command == "close":
            study.status = "closed"
            session.commit()
            return 0
        from study.report import answers_csv, load_readings, report_html, statistics_csv
        from study.statistics import study_statistics

        readings = load_readings(session, study)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "answers.csv").write_text(answers_csv(session, study))
        (args.out / "statistics.csv").write_text(statistics_csv(study_statistics(readings)))
        (args.out / "report.html").write_text(report_html(study, readings, args.note))
        print(f"wrote {args.out}/answers.csv, statistics.csv, report.html ({len(readings)} answers)")
        return 0


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    from service.processes import PortInUse
    from study.create import StudySetupError

    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, StudySetupError, ValidationError, PortInUse) as error:
        message = str(error).replace("\n", " ")
    except OperationalError as error:
        message = f"cannot use the database {args.db}: {error.orig}"
    print(f"python -m study: error: {message}", file=sys.stderr)
    return 2
