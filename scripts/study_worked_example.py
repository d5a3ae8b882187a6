"""The worked example of docs/reader-study.md: a study of real nih-sample radiographs and images from a
bundle, read by two *scripted* readers (``study.scripted``: seeded coin flips, not radiologists), with
screenshots of the reading screen on a real and on a synthetic case, of the admin page, and the report.

    python scripts/study_worked_example.py --real nih:../shared/data/nih-sample --bundle models/demo \
        --out docs/reader-study

Writes into --out: reading-real.png, reading-synthetic.png, admin.png, accuracy.png, roc.png,
findings.png, answers.csv, statistics.csv, report.html, and the study database study.db beside them
in a temporary directory (the database holds the images and is not kept).
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import tempfile
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,860")
NOTE = ("Answers from two scripted readers (study.scripted: seeded coin flips that never look at the image), "
        "not from radiologists; the figures show the pipeline, not the realism of the images.")


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def read_in_browser(driver, link: str, reader: str, origin_of: dict[str, str], out: Path) -> None:
    """Answer every case of ``link`` with the scripted plan, by keyboard; screenshot the first real and
    the first synthetic case as they are shown, findings ticked, before submitting."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from study.scripted import scripted_answer

    driver.get(link)
    shot = set()
    for number in range(1, len(origin_of) + 1):
        WebDriverWait(driver, 30).until(lambda d, n=number: d.execute_script("return document.body.dataset.case") == str(n))
        key = driver.execute_script("return state.case.key")
        answer = scripted_answer(reader, number)
        for finding in answer["findings"]:
            driver.find_element(By.CSS_SELECTOR, f'#findings input[value="{finding}"]').click()
        ActionChains(driver).send_keys(answer["call"][0], str(answer["confidence"])).perform()
        origin = origin_of[key]
        if origin not in shot:
            driver.save_screenshot(str(out / f"reading-{origin}.png"))
            shot.add(origin)
        ActionChains(driver).send_keys(Keys.ENTER).perform()
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.case") == "done")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--lco", default="{}", help="LCO options as JSON (python -m study create --lco)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from study.app import create_app, serve_in_thread
    from study.cli import main as study_main
    from study.report import answers_csv, load_readings, plots, report_html, statistics_csv
    from study.scripted import read_study
    from study.statistics import study_statistics
    from study.storage import Assignment, Study, session_factory

    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="study-example-"))
    url = f"sqlite:///{work / 'study.db'}"
    status = study_main(["create", "--db", url, "--name", "worked-example", "--title", "Worked example (scripted readers)",
                         "--real", args.real, "--synthetic", f"bundle:{args.bundle}", "--cases", str(args.cases),
                         "--lco", args.lco, "--readers", "scripted-1,scripted-2", "--seed", "2026", "--links", str(work / "links.json")])
    if status:
        return status
    links = json.loads((work / "links.json").read_text())
    sessions = session_factory(url)
    with sessions() as session:
        origin_of = {a.key: a.case.origin for a in session.query(Assignment)}
    with serve_in_thread(create_app(url)) as base:
        local = {who: link.replace("http://127.0.0.1:8020", base) for who, link in links.items()}
        driver = browser(work / "profile")
        try:
            reader_keys = {k: v for k, v in origin_of.items()
                           if k in {a.key for a in sessions().query(Assignment).filter(
                               Assignment.reader.has(name="scripted-1"))}}
            read_in_browser(driver, local["scripted-1"], "scripted-1", reader_keys, args.out)
            read_study(local["scripted-2"], "scripted-2")
            driver.get(local["admin"])
            driver.save_screenshot(str(args.out / "admin.png"))
        finally:
            driver.quit()
    with sessions() as session:
        study = session.query(Study).filter_by(name="worked-example").one()
        readings = load_readings(session, study)
        (args.out / "answers.csv").write_text(answers_csv(session, study))
        (args.out / "statistics.csv").write_text(statistics_csv(study_statistics(readings)))
        (args.out / "report.html").write_text(report_html(study, readings, NOTE))
        for name, data in plots(study_statistics(readings), readings).items():
            (args.out / f"{name}.png").write_bytes(base64.b64decode(data))
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
