"""Study storage on SQLite and on a real PostgreSQL server: the Alembic migrations, answers stored once
and kept across reloads, and bad input refused with nothing stored changed."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError
from starlette.testclient import TestClient

from study.app import create_app
from study.storage import Answer, Assignment, Reader, make_engine, migrate, session_factory
from tests.study_support import small_study


def client(url: str) -> TestClient:
    return TestClient(create_app(url))


def reader_base(links, reader: str) -> str:
    return f"/studies/{links.name}/read/{links.reader_tokens[reader]}"


def stored_answers(url: str) -> list[tuple]:
    with session_factory(url)() as session:
        rows = session.query(Reader.name, Assignment.position, Answer.call, Answer.confidence, Answer.findings) \
            .join(Assignment, Assignment.reader_id == Reader.id).join(Answer).order_by(Reader.name, Assignment.position)
        return [tuple(row) for row in rows]


def test_migrations_make_the_schema_and_rerunning_them_changes_nothing(database_url):
    engine = make_engine(database_url)
    tables = set(inspect(engine).get_table_names())
    assert {"studies", "cases", "readers", "assignments", "answers", "alembic_version"} <= tables
    migrate(database_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
    engine.dispose()


def test_an_answer_is_stored_once_and_survives_a_reload(database_url):
    links = small_study(database_url)
    base = reader_base(links, "ann")
    first = client(database_url).get(f"{base}/state").json()
    assert (first["answered"], first["total"], first["case"]["number"]) == (0, 6, 1)
    response = client(database_url).post(f"{base}/cases/{first['case']['key']}/answer",
                                         json={"call": "synthetic", "confidence": 4, "findings": ["Mass", "effusion"]})
    assert response.status_code == 201 and response.json() == {"answered": 1, "total": 6}
    # a new app over the same database: what a reload or a restarted server sees
    again = client(database_url).get(f"{base}/state").json()
    assert (again["answered"], again["case"]["number"]) == (1, 2)
    assert again["case"]["key"] != first["case"]["key"]
    assert stored_answers(database_url) == [("ann", 0, "synthetic", 4, "Effusion|Mass")]


def test_double_submits_store_one_answer(database_url):
    links = small_study(database_url)
    base = reader_base(links, "bob")
    key = client(database_url).get(f"{base}/state").json()["case"]["key"]
    statuses, barrier = [], threading.Barrier(4)

    def submit(confidence: int) -> None:
        app = client(database_url)
        barrier.wait()
        statuses.append(app.post(f"{base}/cases/{key}/answer", json={"call": "real", "confidence": confidence}).status_code)

    threads = [threading.Thread(target=submit, args=(c,)) for c in (1, 2, 3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [201, 409, 409, 409]
    assert len(stored_answers(database_url)) == 1
    # the schema itself refuses a second answer and a confidence out of range
    sessions = session_factory(database_url)
    with sessions() as session:
        assignment = session.query(Assignment).filter_by(key=key).one()
        session.add(Answer(assignment_id=assignment.id, call="real", confidence=2))
        with pytest.raises(IntegrityError):
            session.commit()
    with sessions() as session:
        other = session.query(Assignment).filter(Assignment.key != key).first()
        session.add(Answer(assignment_id=other.id, call="real", confidence=6))
        with pytest.raises(IntegrityError):
            session.commit()
    assert len(stored_answers(database_url)) == 1


def test_bad_input_is_refused_with_a_message_and_nothing_stored_changes(database_url):
    links = small_study(database_url)
    app = client(database_url)
    ann, bob = reader_base(links, "ann"), reader_base(links, "bob")
    ann_key = app.get(f"{ann}/state").json()["case"]["key"]
    bob_key = app.get(f"{bob}/state").json()["case"]["key"]
    assert app.post(f"{ann}/cases/{ann_key}/answer", json={"call": "real", "confidence": 2}).status_code == 201
    before = stored_answers(database_url)
    second_key = app.get(f"{ann}/state").json()["case"]["key"]

    def refused(method: str, path: str, status: int, words: str, **kwargs) -> None:
        response = app.request(method, path, **kwargs)
        assert response.status_code == status, (path, response.text)
        assert words in response.json()["error"], response.json()

    valid = {"call": "synthetic", "confidence": 3}
    refused("POST", f"{ann}/cases/forged0000000000/answer", 404, "no case 'forged0000000000'", json=valid)
    refused("GET", f"{ann}/cases/forged0000000000/image", 404, "no case", )
    refused("POST", f"{ann}/cases/{bob_key}/answer", 404, "in this reader's list", json=valid)  # bob's case
    refused("POST", f"/studies/{links.name}/read/not-a-token/cases/{ann_key}/answer", 403, "not a reader", json=valid)
    refused("POST", f"/studies/{links.name}/read/{links.admin_token}/cases/{ann_key}/answer", 403, "not a reader",
            json=valid)
    refused("POST", f"{ann}/cases/{ann_key}/answer", 409, "already answered", json=valid)  # replay
    for confidence in (0, 6, "3", 3.5, True, None):
        refused("POST", f"{ann}/cases/{second_key}/answer", 400, "confidence must be", json={"call": "real",
                                                                                              "confidence": confidence})
    refused("POST", f"{ann}/cases/{second_key}/answer", 400, "call must be", json={"call": "maybe", "confidence": 3})
    refused("POST", f"{ann}/cases/{second_key}/answer", 400, "unknown label", json=valid | {"findings": ["Tumour"]})
    refused("POST", f"{ann}/cases/{second_key}/answer", 400, "unknown field", json=valid | {"origin": "real"})
    refused("POST", f"{ann}/cases/{second_key}/answer", 400, "send a JSON object", content=b"call=real")
    later = app.get(f"{ann}/state").json()
    with session_factory(database_url)() as session:
        third = session.query(Assignment).join(Reader).filter(Reader.name == "ann", Assignment.position == 2).one()
    refused("POST", f"{ann}/cases/{third.key}/answer", 409, "answer case 2 first", json=valid)
    refused("POST", f"/studies/no-such-study/read/{links.reader_tokens['ann']}/cases/{second_key}/answer", 404,
            "no study named 'no-such-study'", json=valid)
    refused("GET", f"/studies/{links.name}/admin/{links.reader_tokens['ann']}/answers.csv", 403, "not the admin token")
    assert later["answered"] == 1 and stored_answers(database_url) == before

    closed = app.post(f"/studies/{links.name}/admin/{links.admin_token}/close", follow_redirects=False)
    assert closed.status_code == 303
    refused("POST", f"{ann}/cases/{second_key}/answer", 409, "is closed", json=valid)
    assert app.get(f"{ann}/state").json()["status"] == "closed"
    assert stored_answers(database_url) == before
    page = app.get(f"/studies/no-such-study/read/{links.reader_tokens['ann']}")
    assert page.status_code == 404 and "no study named" in page.text and page.headers["content-type"].startswith("text/html")


def test_the_web_app_imports_neither_torch_nor_training():
    import subprocess
    import sys

    code = ("import sys, study.app, study.cli, study.scripted; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.split('.')[0] == 'training'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"
