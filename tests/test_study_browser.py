"""A reader in headless Chromium: opens the link, views and answers cases with the mouse and with the
keyboard, reloads mid-study and resumes, finishes; the stored answers and the statistics are what the
reader did. The app runs under uvicorn on loopback, started and stopped here."""

from __future__ import annotations

import csv
import io
import shutil
import urllib.request

import pytest

from service.labels import format_finding_labels, labels_to_vector
from study.app import create_app, serve_in_thread
from study.scripted import scripted_answer
from study.storage import Answer, Assignment, Reader, session_factory
from tests.study_support import small_study

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,860")


@pytest.fixture
def browser(tmp_path):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed; `make system-deps` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_case(driver, number: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.body.dataset.case") == number)


def centre_pixel(driver) -> int:
    return driver.execute_script(
        "const c = document.getElementById('image');"
        "return c.getContext('2d').getImageData(c.width / 2, c.height / 2, 1, 1).data[0];")


def test_a_reader_answers_reloads_resumes_and_finishes(tmp_path, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url = f"sqlite:///{tmp_path / 'study.db'}"
    from study.storage import migrate

    migrate(url)
    links = small_study(url, readers=("reader-1", "reader-2"), size=64)
    with serve_in_thread(create_app(url)) as base:
        link = links.urls(base)["reader-1"]
        browser.get(link)
        wait_for_case(browser, "1")
        assert "Case 1 of 6" in browser.find_element(By.ID, "progress-text").text
        canvas = browser.find_element(By.ID, "image")

        # viewing: wheel zoom, shift-drag window/level, reset with the 0 key
        before = centre_pixel(browser)
        ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, -400).perform()
        ActionChains(browser).key_down(Keys.SHIFT).click_and_hold(canvas).move_by_offset(-150, -60).release() \
            .key_up(Keys.SHIFT).perform()
        window, level = (int(browser.find_element(By.ID, i).get_attribute("value")) for i in ("window", "level"))
        assert window < 255 and level > 128
        assert centre_pixel(browser) != before  # the narrower, higher window redraws the image
        ActionChains(browser).send_keys("0").perform()
        assert browser.find_element(By.ID, "window").get_attribute("value") == "255"

        given = {}
        for number in range(1, 7):
            wait_for_case(browser, str(number))
            answer = scripted_answer("reader-1", number)
            given[number] = answer
            for finding in answer["findings"]:
                browser.find_element(By.CSS_SELECTOR, f'#findings input[value="{finding}"]').click()
            if number % 2:  # odd cases with the mouse
                browser.find_element(By.CSS_SELECTOR, f'#call button[data-call="{answer["call"]}"]').click()
                browser.find_element(By.CSS_SELECTOR, f'#confidence button[data-confidence="{answer["confidence"]}"]') \
                    .click()
                browser.find_element(By.ID, "submit").click()
            else:  # even cases with the keyboard
                assert not browser.find_element(By.ID, "submit").is_enabled()
                ActionChains(browser).send_keys(answer["call"][0], str(answer["confidence"]), Keys.ENTER).perform()
            if number == 3:  # reload mid-study: the page comes back at case 4
                wait_for_case(browser, "4")
                browser.refresh()
                wait_for_case(browser, "4")
                assert "Case 4 of 6 (3 answered)" in browser.find_element(By.ID, "progress-text").text
        wait_for_case(browser, "done")
        assert browser.find_element(By.ID, "done").is_displayed()
        assert "All 6 cases answered" in browser.find_element(By.ID, "progress-text").text
        browser.save_screenshot(str(tmp_path / "done.png"))
        with urllib.request.urlopen(links.urls(base)["admin"] + "/statistics.csv") as response:
            statistics = list(csv.DictReader(io.StringIO(response.read().decode())))

    with session_factory(url)() as session:
        rows = (session.query(Assignment.position, Answer.call, Answer.confidence, Answer.findings, Answer.reading_ms)
                .join(Reader).join(Answer).filter(Reader.name == "reader-1").order_by(Assignment.position).all())
        origins = [a.case.origin for a in session.query(Assignment).join(Reader).filter(Reader.name == "reader-1")
                   .order_by(Assignment.position)]
        assert session.query(Answer).count() == 6  # reader-2 answered nothing
    stored = [(p + 1, call, confidence, findings) for p, call, confidence, findings, _ in rows]
    expected = [(n, a["call"], a["confidence"], format_finding_labels(labels_to_vector(a["findings"])))
                for n, a in given.items()]
    assert stored == expected
    assert all(ms is not None and ms >= 0 for *_, ms in rows)
    correct = sum(given[n]["call"] == origins[n - 1] for n in given)
    row = next(r for r in statistics if r["kind"] == "reader" and r["name"] == "reader-1")
    assert (int(row["accuracy_count"]), int(row["accuracy_total"])) == (correct, 6)
    synthetic_called = sum(given[n]["call"] == "synthetic" for n in given if origins[n - 1] == "synthetic")
    assert int(row["sensitivity_count"]) == synthetic_called
