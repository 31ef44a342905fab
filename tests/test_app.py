"""The Gradio app (`coglm-hf serve`): handlers, the named API endpoints through gradio_client, and a real browser.

One server (a `coglm-hf serve` subprocess on the demo model) serves every check of this file. The browser test
drives headless Chromium through chromedriver (Debian packages `chromium` and `chromium-driver`); it skips with a
reason where they are absent, and fails instead under CI=1 (`.ci/run` installs them). With
COGLM_APP_SCREENSHOTS=DIR it also saves a screenshot of each tab there (docs/app.md uses them).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

gradio = pytest.importorskip("gradio", reason='the app extra is not installed (pip install -e ".[app]")')

from coglm_hf.app import CogView2App  # noqa: E402
from coglm_hf.demo import default_model_path  # noqa: E402
from coglm_hf.demo.shapes import HIRES_SIZE, Scene, Shape, render  # noqa: E402

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1000")
SCENE = Scene("blue", (Shape("circle", "red", 120, 120, 52),))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("app") / "scene.png"
    render(SCENE, HIRES_SIZE).save(path)
    return path


@pytest.fixture(scope="module")
def server():
    """`coglm-hf serve` on a free port (demo model); yields its URL, stops it afterwards."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "coglm_hf.cli", "serve", "--port", str(port)], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"coglm-hf serve exited with {process.returncode}:\n{log.read().decode()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("coglm-hf serve did not answer within 300 s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


# ------------------------------------------------------------------------------------------------ handlers
@pytest.fixture(scope="module")
def app():
    from coglm_hf.pipeline_cogview2 import CogView2Pipeline

    return CogView2App(CogView2Pipeline.from_pretrained(default_model_path()), max_images=2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda app: app.generate("   ", "mainbody", 1, 0, 0), "prompt is empty"),
        (lambda app: app.generate("a red circle", "mainbody", 3, 0, 0), "between 1 and 2"),
        (lambda app: app.generate("a red circle", "nostyle", 1, 0, 0), "unknown style"),
        (lambda app: app.generate("a red circle", "mainbody", 2, 1, 0), "candidates must be 0"),
        (lambda app: app.edit(None, "a red circle", "", 1, 0), "No image"),
        (lambda app: app.edit({"background": render(SCENE, 240), "layers": []}, "a star", "", 1, 0), "No mask"),
        (lambda app: app.edit({"background": render(SCENE, 240), "layers": []}, "a star", "0.5,x", 1, 0),
         "four comma-separated"),
        (lambda app: app.edit({"background": render(SCENE, 240), "layers": []}, "a star", "0.5,0.5,0.2,1", 1, 0),
         "mask_box"),
        (lambda app: app.caption(None, "en", 1), "No image"),
        (lambda app: app.caption(__file__, "en", 1), "not an image"),
    ],
)
def test_bad_input_gets_a_message(app, call, message):
    with pytest.raises(gradio.Error) as raised:
        call(app)
    assert message in raised.value.message


def test_painted_layers_become_the_edit_mask(app):
    layer = PIL.Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (50, 10, 80, 40))
    mask = np.asarray(app.painted_mask([None, layer], (200, 200))) > 0
    assert mask.shape == (200, 200) and mask[20:80, 100:160].all() and mask.sum() == 60 * 60
    assert app.painted_mask([PIL.Image.new("RGBA", (10, 10))], (20, 20)) is None


# ------------------------------------------------------------------------------------------------ API
def test_named_endpoints_work_with_gradio_client(server, scene_png):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate", "/edit", "/caption"} <= endpoints

    gallery = client.predict("a red circle on a blue background", "mainbody", 1, 0, 0, api_name="/generate")
    assert len(gallery) == 1 and PIL.Image.open(gallery[0]["image"]).size == (HIRES_SIZE, HIRES_SIZE)
    caption = client.predict(handle_file(str(scene_png)), "en", 1, api_name="/caption")
    assert "background" in caption
    editor = {"background": handle_file(str(scene_png)), "layers": [], "composite": None}
    edits = client.predict(editor, "a yellow star on a blue background", "0,0.5,1,1", 1, 0, api_name="/edit")
    assert len(edits) == 1

    # a failed request reports its message and the server keeps serving
    with pytest.raises(Exception, match="prompt is empty"):
        client.predict("", "mainbody", 1, 0, 0, api_name="/generate")
    # concurrent requests queue and all finish
    jobs = [client.submit(handle_file(str(scene_png)), "zh", 1, api_name="/caption") for _ in range(3)]
    assert all(job.result(timeout=300) for job in jobs)


# ------------------------------------------------------------------------------------------------ browser
def _browser(profile: str):
    """Headless Chromium with a fresh profile in `profile` and the network log on."""
    if not all(Path(path).is_file() for path in CHROMIUM):
        message = "headless Chromium not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM[0]
    for flag in (*BROWSER_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=Service(CHROMIUM[1]))


def test_browser_generate_edit_caption(server, scene_png):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    screenshots = os.environ.get("COGLM_APP_SCREENSHOTS")
    profile = tempfile.TemporaryDirectory(prefix="coglm-chromium-")
    driver = _browser(profile.name)
    requested: set[str] = set()

    def wait_for(selector: str, timeout: float = 180):
        return WebDriverWait(driver, timeout).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))[0]

    def open_tab(name: str):
        next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name).click()

    def shoot(name: str):
        if screenshots:
            Path(screenshots).mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(Path(screenshots) / f"app_{name}.png"))

    def collect_requests():
        for entry in driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                requested.add(message["params"]["request"]["url"])

    try:
        driver.get(server)
        # Generate: type a prompt, click, an image appears
        wait_for("#generate-prompt textarea").send_keys("a red circle on a blue background")
        wait_for("#generate-button").click()
        image = wait_for("#generate-gallery img")
        assert image.get_attribute("src").startswith(server)
        shoot("generate")

        # Edit: take the generated image, paint a stroke, prompt, click, an edit appears
        open_tab("Edit")
        wait_for("#edit-image")
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Use the first generated image").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#edit-image canvas"))
        time.sleep(1)  # the background image is drawn onto the canvas asynchronously
        wait_for("#edit-image button[aria-label=Brush]").click()
        canvas = wait_for("#edit-image canvas")
        stroke = ActionChains(driver).move_to_element_with_offset(canvas, 30, -60).click_and_hold()
        for _ in range(12):
            stroke = stroke.move_by_offset(0, 10)
        stroke.release().perform()
        wait_for("#edit-prompt textarea").send_keys("a yellow star on a blue background")
        wait_for("#edit-button").click()
        wait_for("#edit-gallery img")
        shoot("edit")

        # Caption: upload a file, click, a caption appears
        open_tab("Caption")
        wait_for("#caption-image input[type=file]").send_keys(str(scene_png))
        wait_for("#caption-image img")
        wait_for("#caption-button").click()
        output = wait_for("#caption-output textarea")
        WebDriverWait(driver, 180).until(lambda d: output.get_attribute("value"))
        assert "background" in output.get_attribute("value")
        shoot("caption")

        # offline: every web request of the page went to the app itself
        collect_requests()
        external = sorted(url for url in requested if url.split(":", 1)[0] in ("http", "https", "ws", "wss")
                          and not url.startswith(server) and not url.startswith(server.replace("http", "ws", 1)))
        assert not external, f"the page fetched from the network: {external[:5]}"
    finally:
        driver.quit()
        profile.cleanup()
