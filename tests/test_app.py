"""The page in a real browser: caption.app started on 127.0.0.1 at a free port, driven by a
headless Chromium (Debian's chromium and chromium-driver, installed by `make test`): a shapes
test image's caption and a word's attention come back; a broken upload shows the message and
the next good upload still works. A screenshot is saved with the test's files."""

import http.client
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from caption import train
from tests.conftest import ROOT, free_port, tiny_args

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import gradio  # noqa: F401 - the page's extra
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    MISSING = ""
except ImportError as e:
    MISSING = f"the app's extras are not installed ({e.name}): pip install -e '.[app,test]'"
if not MISSING and not (CHROMEDRIVER and CHROMIUM):
    MISSING = "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; `make test` does it as root)"
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING)


@pytest.fixture(scope="module")
def talking_run(shapes, tiny_features, tmp_path_factory):
    """A tiny-world run trained long enough to say words."""
    run = tmp_path_factory.mktemp("app") / "run"
    assert train.main(tiny_args(shapes, tiny_features, "--checkpoint_path", str(run), "--max_epochs", "12",
                                "--learning_rate", "3e-3", "--batch_size", "8", "--save_checkpoint_every", "0")) == 0
    return run


@pytest.fixture(scope="module")
def page(talking_run):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "caption.app", "--run", str(talking_run), "--port", port],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:  # the app's own server on this machine, nothing else
            conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=2)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the app did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


def upload_and_caption(driver, path: Path) -> None:
    if not driver.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"):  # a file is shown: clear it first
        buttons = driver.find_elements(By.CSS_SELECTOR, "#upload button")
        labels = [((b.get_attribute("aria-label") or "") + (b.get_attribute("title") or "")).lower() for b in buttons]
        clear = [b for b, label in zip(buttons, labels) if "clear" in label or "remove" in label]
        assert clear, labels
        clear[0].click()
        WebDriverWait(driver, 30).until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
        WebDriverWait(driver, 30).until(lambda d: caption_text(d) == "")  # a cleared file empties the page
    driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(path))  # captioned at once


def caption_text(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")


@pytest.mark.slow
def test_the_page_captions_and_shows_attention(page, browser, shapes, tmp_path):
    wait = WebDriverWait(browser, 90)
    browser.get(page)
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file]")))
    # picking an example captions it, no button pressed, and the photo is shown beside its caption
    picks = browser.find_elements(By.CSS_SELECTOR, "#examples button, #examples tbody tr")
    assert picks, browser.find_element(By.CSS_SELECTOR, "#examples").get_attribute("innerHTML")[:2000]
    picks[0].click()
    wait.until(lambda d: caption_text(d).strip() != "")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#photo img")))
    # an upload is captioned at once as well
    image = sorted((shapes / "images").glob("*.jpg"))[0]
    upload_and_caption(browser, image)
    wait.until(lambda d: caption_text(d).strip() != "")
    first = caption_text(browser)
    assert browser.find_element(By.CSS_SELECTOR, "#photo img").get_attribute("src")
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#attention img")))
    src = browser.find_element(By.CSS_SELECTOR, "#attention img").get_attribute("src")
    assert src and (src.startswith("data:image") or "/file=" in src or "gradio_api" in src)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#words input[type=radio]")) == len(first.split())
    browser.save_screenshot(str(tmp_path / "app.png"))
    assert (tmp_path / "app.png").stat().st_size > 10_000

    # a text file named .jpg: the message on the page, and the server goes on
    broken = tmp_path / "broken.jpg"
    broken.write_text("this is not a JPEG\n" * 20)
    upload_and_caption(browser, broken)
    wait.until(lambda d: "Could not caption" in d.find_element(By.CSS_SELECTOR, "#message").text)
    assert "not an image" in browser.find_element(By.CSS_SELECTOR, "#message").text
    assert caption_text(browser) == ""
    # an image whose header says 20,000 x 20,000: refused before it is decoded
    from tests.test_service import huge_png_header
    huge = tmp_path / "huge.png"
    huge.write_bytes(huge_png_header(20_000, 20_000))
    upload_and_caption(browser, huge)
    wait.until(lambda d: "too large" in d.find_element(By.CSS_SELECTOR, "#message").text)
    upload_and_caption(browser, image)
    wait.until(lambda d: caption_text(d).strip() != "")
    assert caption_text(browser) == first and browser.find_element(By.CSS_SELECTOR, "#message").text.strip() == ""
    shots = os.environ.get("APP_SCREENSHOT")
    if shots:  # to refresh the README's picture: APP_SCREENSHOT=docs/app.png make test
        shutil.copy(tmp_path / "app.png", ROOT / shots)
