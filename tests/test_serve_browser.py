"""`omnitok serve`'s chat page in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium) opens the page of a real server process, attaches a picture, sends requests, and the streamed answers show
a picture and an audio player. The screenshot is kept in test-artifacts/ (or $OMNITOK_TEST_ARTIFACTS)."""

import os
import shutil
from pathlib import Path

import pytest
from conftest import PHOTOS
from PIL import Image as PILImage
from test_serve_api import running_server

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="needs Debian's chromium and chromium-driver (CI installs them)")
ARTIFACTS = Path(os.environ.get("OMNITOK_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


def test_the_chat_page_streams_pictures_and_sounds_in_a_real_browser(chat_model_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    PILImage.fromarray(PHOTOS[1]).resize((32, 32)).save(tmp_path / "photo.png")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,900"):
        options.add_argument(flag)
    with running_server(chat_model_dir, tmp_path, "--api-key", "page-key", "--max-new-tokens", "100",
                        "audio.guidance=1.5", "image.guidance=2", "image.top_k=50", "max_audio_s=0.06") as (url, _):
        browser = webdriver.Chrome(service=Service(DRIVER), options=options)
        try:
            browser.get(f"{url}/?api_key=page-key")
            assert browser.title == "omnitok"
            wait = WebDriverWait(browser, 60)
            browser.find_element(By.ID, "files").send_keys(str(tmp_path / "photo.png"))
            for k, text in enumerate(["What is this?", "Draw a red circle.", "Play a rising chirp.", "And another.",
                                      "Once more.", "Again, please."]):
                browser.find_element(By.ID, "text").send_keys(text)
                browser.find_element(By.ID, "send").click()
                wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done]")) == k + 1)
                pictures = browser.find_elements(By.CSS_SELECTOR, ".assistant img")
                players = browser.find_elements(By.CSS_SELECTOR, ".assistant audio")
                if pictures and players:
                    break
            assert browser.find_elements(By.CSS_SELECTOR, ".user img")  # the attached picture, shown in the turn
            assert pictures and players, browser.find_element(By.ID, "log").text
            assert all(p.get_attribute("src").startswith("data:image/png;base64,") for p in pictures)
            assert all(p.get_attribute("naturalWidth") not in (None, "0") for p in pictures)  # they decode
            assert all(a.get_attribute("src").startswith("data:audio/wav;base64,") for a in players)
            assert not browser.find_elements(By.CSS_SELECTOR, ".error")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))
        finally:
            browser.quit()
