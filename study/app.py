"""The reader web app: one Starlette ASGI app, served by uvicorn (``python -m study serve``).

Its own app rather than routes on the BentoML service: the generator service scales with GPUs and may
run without a database, while a study needs one database and a few CPU-light processes for weeks; the
two share nothing but the images the set-up step already stored. Torch-free: only SQLAlchemy,
Starlette, the statistics libraries and ``service.labels``.

Readers: ``/studies/{study}/read/{token}`` (the page), and under it ``state`` (JSON),
``cases/{key}/image`` (PNG) and ``cases/{key}/answer`` (POST JSON). Admin:
``/studies/{study}/admin/{token}`` (progress page), ``…/close`` (POST), ``…/answers.csv``,
``…/statistics.csv``, ``…/report.html``. Errors are JSON ``{"error": message}`` (HTML for pages):
404 unknown study, case or link, 403 a token that is not this study's, 400 an invalid answer,
409 a replayed or out-of-order answer or a closed study.
"""

from __future__ import annotations

import html
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from service.labels import LABELS, UnknownLabelError, format_finding_labels, labels_to_vector
from study.report import answers_csv, load_readings, report_html, statistics_csv
from study.statistics import study_statistics
from study.storage import (
    CONFIDENCE_RANGE,
    ORIGINS,
    Answer,
    Assignment,
    Reader,
    Study,
    session_factory,
    token_digest,
)

STATIC = Path(__file__).parent / "static"
MAX_ANSWER_BYTES = 4096
# The PNG response carries only these headers (plus the server's Date, Server and Content-Length), the
# same for every case: no ETag or Last-Modified that could differ by source.
IMAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class StudyHTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _study(session, name: str) -> Study:
    study = session.query(Study).filter_by(name=name).one_or_none()
    if study is None:
        raise StudyHTTPError(404, f"there is no study named {name!r}; check the link")
    return study


def _reader(session, study: Study, token: str) -> Reader:
    reader = session.query(Reader).filter_by(study_id=study.id, token_sha256=token_digest(token)).one_or_none()
    if reader is None:
        raise StudyHTTPError(403, f"this link's token is not a reader of study {study.name!r}; ask for your link")
    return reader


def _admin(session, study: Study, token: str) -> None:
    if token_digest(token) != study.admin_token_sha256:
        raise StudyHTTPError(403, f"this link's token is not the admin token of study {study.name!r}")


def _assignment(session, reader: Reader, key: str) -> Assignment:
    assignment = session.query(Assignment).filter_by(reader_id=reader.id, key=key).one_or_none()
    if assignment is None:
        raise StudyHTTPError(404, f"there is no case {key!r} in this reader's list")
    return assignment


def _next(session, reader: Reader) -> Assignment | None:
    return (session.query(Assignment).outerjoin(Answer).filter(Assignment.reader_id == reader.id, Answer.id.is_(None))
            .order_by(Assignment.position).first())


def parse_answer(body: bytes, ask_findings: bool) -> dict:
    """The answer's fields from a JSON body; StudyHTTPError 400 naming the field that is wrong."""
    if len(body) > MAX_ANSWER_BYTES:
        raise StudyHTTPError(413, f"an answer is at most {MAX_ANSWER_BYTES} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        raise StudyHTTPError(400, 'send a JSON object: {"call": "real"|"synthetic", "confidence": 1-5}') from None
    if not isinstance(data, dict):
        raise StudyHTTPError(400, "the answer must be a JSON object")
    unknown = sorted(set(data) - {"call", "confidence", "findings", "reading_ms"})
    if unknown:
        raise StudyHTTPError(400, f"unknown field(s) {', '.join(unknown)}; valid: call, confidence, findings, reading_ms")
    if data.get("call") not in ORIGINS:
        raise StudyHTTPError(400, f"call must be \"real\" or \"synthetic\", got {data.get('call')!r}")
    confidence = data.get("confidence")
    low, high = CONFIDENCE_RANGE
    if not isinstance(confidence, int) or isinstance(confidence, bool) or not low <= confidence <= high:
        raise StudyHTTPError(400, f"confidence must be a whole number from {low} to {high}, got {confidence!r}")
    findings = data.get("findings")
    if findings is not None:
        if not ask_findings:
            raise StudyHTTPError(400, "this study does not ask for findings; leave 'findings' out")
        if not isinstance(findings, list) or not all(isinstance(f, str) for f in findings):
            raise StudyHTTPError(400, "findings must be a list of finding names")
        try:
            findings = format_finding_labels(labels_to_vector(findings))
        except UnknownLabelError as error:
            raise StudyHTTPError(400, str(error)) from None
    elif ask_findings:
        findings = "No Finding"  # asked and none ticked
    reading_ms = data.get("reading_ms")
    if reading_ms is not None and (not isinstance(reading_ms, int) or isinstance(reading_ms, bool)
                                   or not 0 <= reading_ms < 2**31):
        raise StudyHTTPError(400, "reading_ms must be a whole number of milliseconds")
    return {"call": data["call"], "confidence": confidence, "findings": findings, "reading_ms": reading_ms}


def create_app(database_url: str) -> Starlette:
    """The reader and admin app over the study database at ``database_url`` (migrated beforehand)."""
    sessions = session_factory(database_url)

    def reader_state(study_name: str, token: str) -> dict:
        with sessions() as session:
            study = _study(session, study_name)
            reader = _reader(session, study, token)
            total = len(reader.assignments)
            upcoming = _next(session, reader)
            answered = upcoming.position if upcoming else total
            return {"title": study.title, "status": study.status, "reader": reader.name, "total": total,
                    "answered": answered, "ask_findings": study.ask_findings, "labels": list(LABELS),
                    "case": None if upcoming is None else {"key": upcoming.key, "number": upcoming.position + 1}}

    def case_image(study_name: str, token: str, key: str) -> bytes:
        with sessions() as session:
            study = _study(session, study_name)
            return _assignment(session, _reader(session, study, token), key).case.png

    def record_answer(study_name: str, token: str, key: str, body: bytes) -> dict:
        with sessions() as session:
            study = _study(session, study_name)
            reader = _reader(session, study, token)
            assignment = _assignment(session, reader, key)
            if study.status != "open":
                raise StudyHTTPError(409, f"study {study.name!r} is closed; answers are no longer taken")
            if assignment.answer is not None:
                raise StudyHTTPError(409, f"case {assignment.position + 1} is already answered; the first answer stands")
            upcoming = _next(session, reader)
            if upcoming is not None and upcoming.id != assignment.id:
                raise StudyHTTPError(409, f"answer case {upcoming.position + 1} first; cases are read in order")
            fields = parse_answer(body, study.ask_findings)
            session.add(Answer(assignment_id=assignment.id, **fields))
            try:
                session.commit()
            except IntegrityError:  # a concurrent submit of the same case won the race
                session.rollback()
                raise StudyHTTPError(409, f"case {assignment.position + 1} is already answered; the first answer stands")
            total = len(reader.assignments)
            upcoming = _next(session, reader)
            return {"answered": upcoming.position if upcoming else total, "total": total}

    def admin_page(study_name: str, token: str) -> str:
        with sessions() as session:
            study = _study(session, study_name)
            _admin(session, study, token)
            return admin_html(session, study, token)

    def admin_export(study_name: str, token: str, what: str) -> tuple[str, str]:
        with sessions() as session:
            study = _study(session, study_name)
            _admin(session, study, token)
            if what not in EXPORTS:
                raise StudyHTTPError(404, f"no export {what!r}; choose one of {', '.join(EXPORTS)}")
            if what == "answers.csv":
                return answers_csv(session, study), "text/csv"
            readings = load_readings(session, study)
            if what == "statistics.csv":
                return statistics_csv(study_statistics(readings)), "text/csv"
            return report_html(study, readings), "text/html"

    def close_study(study_name: str, token: str) -> None:
        with sessions.begin() as session:
            study = _study(session, study_name)
            _admin(session, study, token)
            study.status = "closed"

    async def read_page(request: Request) -> Response:
        await run_in_threadpool(reader_state, request.path_params["study"], request.path_params["token"])
        return HTMLResponse((STATIC / "reader.html").read_text(), headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> Response:
        p = request.path_params
        return JSONResponse(await run_in_threadpool(reader_state, p["study"], p["token"]),
                            headers={"Cache-Control": "no-store"})

    async def image(request: Request) -> Response:
        p = request.path_params
        png = await run_in_threadpool(case_image, p["study"], p["token"], p["key"])
        return Response(png, media_type="image/png", headers=IMAGE_HEADERS)

    async def answer(request: Request) -> Response:
        p = request.path_params
        body = await request.body()
        return JSONResponse(await run_in_threadpool(record_answer, p["study"], p["token"], p["key"], body),
                            status_code=201)

    async def admin(request: Request) -> Response:
        p = request.path_params
        return HTMLResponse(await run_in_threadpool(admin_page, p["study"], p["token"]))

    async def export(request: Request) -> Response:
        p = request.path_params
        content, media_type = await run_in_threadpool(admin_export, p["study"], p["token"], p["what"])
        headers = {} if media_type == "text/html" else {
            "Content-Disposition": f'attachment; filename="{p["study"]}-{p["what"]}"'}
        return Response(content, media_type=media_type, headers=headers)

    async def close(request: Request) -> Response:
        p = request.path_params
        await run_in_threadpool(close_study, p["study"], p["token"])
        return RedirectResponse(f"/studies/{p['study']}/admin/{p['token']}", status_code=303)

    async def study_error(request: Request, error: StudyHTTPError) -> Response:
        if request.method == "GET" and request.url.path.rstrip("/").split("/")[-2] in ("read", "admin"):
            return HTMLResponse(f"<!doctype html><title>Reader study</title><p>{html.escape(error.message)}</p>",
                                status_code=error.status)
        return JSONResponse({"error": error.message}, status_code=error.status)

    routes = [
        Route("/studies/{study}/read/{token}", read_page),
        Route("/studies/{study}/read/{token}/state", state),
        Route("/studies/{study}/read/{token}/cases/{key}/image", image),
        Route("/studies/{study}/read/{token}/cases/{key}/answer", answer, methods=["POST"]),
        Route("/studies/{study}/admin/{token}", admin),
        Route("/studies/{study}/admin/{token}/close", close, methods=["POST"]),
        Route("/studies/{study}/admin/{token}/{what:str}", export),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, exception_handlers={StudyHTTPError: study_error})


EXPORTS = ("answers.csv", "statistics.csv", "report.html")


def admin_html(session, study: Study, token: str) -> str:
    e = html.escape
    rows = []
    for reader in study.readers:
        answered = sum(a.answer is not None for a in reader.assignments)
        total = len(reader.assignments)
        last = max((a.answer.answered_at for a in reader.assignments if a.answer is not None), default=None)
        rows.append(f"<tr><td>{e(reader.name)}</td><td><progress max='{total}' value='{answered}'></progress> "
                    f"{answered}/{total}</td><td>{last.isoformat(timespec='seconds') if last else '–'}</td></tr>")
    base = f"/studies/{e(study.name)}/admin/{e(token)}"
    links = " · ".join(f'<a href="{base}/{name}">{name}</a>' for name in EXPORTS)
    close = ("" if study.status != "open" else
             f'<form method="post" action="{base}/close" onsubmit="return confirm(\'Close the study? Readers can no '
             f'longer answer.\')"><button>Close the study</button></form>')
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(study.title)}: admin</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}td,th{{border:1px solid #bbb;padding:.3em .7em}}
table{{border-collapse:collapse}}</style></head><body><h1>{e(study.title)}</h1>
<p>Study <code>{e(study.name)}</code> is <b id="status">{e(study.status)}</b>; {len(study.cases)} cases per reader.</p>
<table id="progress"><tr><th>reader</th><th>progress</th><th>last answer (UTC)</th></tr>{''.join(rows)}</table>
<p>Export: {links}</p>{close}</body></html>"""


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1") -> Iterator[str]:
    """``app`` under uvicorn in a thread on a port the system picks; yields the base URL and stops the
    server on exit. For tests and scripts; ``python -m study serve`` serves in the foreground."""
    import uvicorn

    listener = socket.socket()
    listener.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()
