"""The triage page in headless Chromium (selenium): ranked rows in order, the studies listed apart, the
not-clinical banner, and a study page; the list's screenshot goes to
$MAMMO_SCREENSHOT_DIR (docs/ keeps one: MAMMO_SCREENSHOT_DIR=docs pytest tests/test_api_browser.py), else tmp.

Needs Debian's chromium and chromium-driver (bash deploy/install-system-deps.sh): skipped without them on a
developer machine, failed under CI."""

from __future__ import annotations

import os
from pathlib import Path

from dicom_node.settings import Settings
from tests.conftest import free_port, require_tool
from tests.worklist_rows import FOUR, add_study
from worklist.api import serve_api_in_thread
from worklist.db import make_engine, session_factory, upgrade
from worklist.models import ExportState, StudyState

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def test_triage_page_in_headless_chromium(tmp_path: Path) -> None:
    require_tool(CHROMIUM)
    require_tool(CHROMEDRIVER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    url = f"sqlite:///{tmp_path / 'worklist.sqlite'}"
    engine = make_engine(url)
    upgrade(engine)
    sessions = session_factory(engine)
    delivered = (ExportState.DELIVERED,) * 5
    ranked = [add_study(sessions, number, StudyState.ANALYSED, suspicion, minutes=minutes, exports=delivered)
              for number, suspicion, minutes in ((1, 0.91, 40), (2, 0.62, 10), (3, 0.62, 25), (4, 0.18, 5))]
    incomplete = add_study(sessions, 5, StudyState.ANALYSED, 0.47, minutes=50, views=FOUR[:3],
                           exports=(ExportState.DELIVERED, ExportState.PENDING))
    failed = add_study(sessions, 6, StudyState.FAILED, minutes=55,
                       error="ImageDecodeError: LMLO: pixel data cannot be decoded")
    waiting = add_study(sessions, 7, StudyState.RECEIVING, minutes=58, views=FOUR[:2])
    settings = Settings(data_dir=tmp_path / "data", db_url=url, api_port=free_port(),
                        api_allow_local_unauthenticated=True)  # the demo's setting: a loopback browser gets in
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(argument)
    with serve_api_in_thread(settings, sessions) as server:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            driver.get(f"{server.url}/")

            def section(name: str) -> list[str]:
                return [row.get_attribute("data-uid")
                        for row in driver.find_elements(By.CSS_SELECTOR, f"#{name} tr.study-row")]

            assert section("ranked") == ranked  # 0.62 twice: the one waiting longer (10 min) first
            assert (section("incomplete"), section("failed"), section("in_progress")) == ([incomplete], [failed],
                                                                                           [waiting])
            assert "NOT a clinical model" in driver.find_element(By.CSS_SELECTOR, ".banner").text
            screenshots = Path(os.environ.get("MAMMO_SCREENSHOT_DIR") or tmp_path)
            screenshots.mkdir(parents=True, exist_ok=True)
            assert driver.save_screenshot(str(screenshots / "triage-page.png"))
            driver.find_element(By.CSS_SELECTOR, f'#ranked tr[data-uid="{ranked[0]}"] a').click()
            assert driver.current_url.endswith(f"/studies/{ranked[0]}")
            assert len(driver.find_elements(By.CSS_SELECTOR, ".views figure")) == 4
        finally:
            driver.quit()
    engine.dispose()
