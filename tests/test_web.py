"""`llava-getok web` as a person uses it: the app launched on 127.0.0.1 (a process, as typed) with the trained tiny GETok
checkpoint, driven (a) through gradio_client and (b) in a real headless Chromium (Debian's chromium and chromedriver,
through selenium): pick or upload an image, ground a phrase, and the returned picture has the predicted box drawn
where the answer says (its pixels read at the box's edges). A bad upload is answered with a message and the app keeps
serving. One server for the module."""
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
requests = pytest.importorskip("requests")

REPO = Path(__file__).resolve().parents[1]
IMAGE = "000000183709.jpg"  # 480 x 640
PRED = (235, 40, 40)  # viz.PRED: the colour of predicted shapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_getok_checkpoint, shared_data):
    """The app, started with the command the demo prints for its model (``web_command``: this environment's
    llava-getok; here run as ``python -m llava_getok.cli`` so that it is this checkout's code), on a free port."""
    import shlex

    from llava_getok.web import web_command

    command = shlex.split(web_command(tiny_getok_checkpoint, shared_data / "coco_mini" / "val2017"))
    assert Path(command[0]).name == "llava-getok" and command[1] == "web"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False")
    proc = subprocess.Popen([sys.executable, "-m", "llava_getok.cli", *command[1:], "--device", "cpu", "--port",
                             str(port), "--max-new-tokens", "16"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if requests.get(url, timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        else:
            raise AssertionError("the web app did not answer within 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def expected_box(raw: str, size=(480, 640)):
    import llava_getok as gt
    from llava_getok.parse import parse
    from llava_getok.records import shapes_to_pixels

    shapes = shapes_to_pixels(parse(raw, gt.GETokConfig(grid=8)).shapes, size, "pad")
    assert [s["kind"] for s in shapes] == ["box"], raw
    return shapes[0]["points"]


def assert_box_drawn(picture: np.ndarray, points):
    """The box's four edges are in the prediction colour: pixels just inside each edge, at its middle."""
    (x1, y1), (x2, y2) = points
    h, w = picture.shape[:2]
    xm, ym = int((x1 + x2) / 2), int((y1 + y2) / 2)
    inside = [(min(int(x1) + 1, w - 1), ym), (max(int(np.ceil(x2)) - 2, 0), ym),
              (xm, min(int(y1) + 1, h - 1)), (xm, max(int(np.ceil(y2)) - 2, 0))]
    for x, y in inside:
        assert tuple(picture[y, x]) == PRED, (x, y, picture[y, x], points)


def test_gradio_client_grounds_a_phrase_and_gets_the_box_drawn(server, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) >= {
        "/upload", "/pick", "/ask", "/ground", "/clear"}
    picture, chat, raw, shapes = client.predict(IMAGE, api_name="/pick")
    assert Image.open(picture).size == (480, 640) and chat == [] and shapes == []
    updates = list(client.submit("box", "the person", False, False, api_name="/ground"))
    chat, picture, raw, shapes = updates[-1]
    assert re.fullmatch(r"<box>(<grid_\d_\d><off_-?\d_-?\d>){2}</box>", raw), raw
    assert chat[-1]["content"][0]["text"] == f"`{raw}`"  # shown in a code span: Markdown keeps the tags visible
    points = expected_box(raw)
    assert shapes == [{"kind": "box", "points": points}]
    for update in updates:  # a shape appears once its group has closed, never before
        if len(update) == 4:  # gradio's client may also yield a one-value update while the stream runs
            assert len(update[3]) == update[2].count("</box>")
    assert_box_drawn(np.asarray(Image.open(picture).convert("RGB")), points)

    bad = tmp_path / "truncated.png"
    whole = io.BytesIO()
    Image.open(REPO / "tests" / "fixtures" / "data" / "coco_mini" / "val2017" / IMAGE).save(whole, format="PNG")
    bad.write_bytes(whole.getvalue()[:5000])
    picture2, chat, _, _ = client.predict(handle_file(str(bad)), api_name="/upload")
    message = chat[-1]["content"][0]["text"]
    assert message.startswith("Cannot use this image: truncated.png: cannot decode the image"), message
    again = list(client.submit("box", "the person", False, False, api_name="/ground"))[-1]
    assert again[2] == raw  # still serving the image it had


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from Debian's packages, driven by Debian's chromedriver."""
    webdriver = pytest.importorskip("selenium.webdriver")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.exists(driver_path) and os.path.exists(chromium)):
        pytest.skip("chromium and chromium-driver are not installed (scripts/setup_env.sh installs them with apt-get)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    yield driver
    driver.quit()


def test_in_a_browser_upload_ground_and_see_the_box(server, browser, shared_data, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(server)
    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#upload input[type=file], input[type=file]")))
    upload.send_keys(str(shared_data / "coco_mini" / "val2017" / IMAGE))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#picture img"))
    phrase = browser.find_element(By.CSS_SELECTOR, "#phrase textarea")
    phrase.send_keys("the person")
    browser.find_element(By.ID, "ground").click()
    raw_box = wait.until(lambda d: (d.find_element(By.CSS_SELECTOR, "#raw textarea").get_attribute("value") or None)
                         if "</box>" in (d.find_element(By.CSS_SELECTOR, "#raw textarea").get_attribute("value") or "")
                         else None)
    wait.until(lambda d: "<box>" in d.find_element(By.ID, "chat").text)  # the tags are shown, not swallowed

    def drawn_picture(d):
        """The picture the page shows once it has the box (None while gradio still swaps the uploaded file for the
        drawn one: the page's src can name a file that is being replaced, which a read then finds cut short)."""
        src = d.find_element(By.CSS_SELECTOR, "#picture img").get_attribute("src")
        try:
            picture = np.asarray(Image.open(io.BytesIO(requests.get(src, timeout=10).content)).convert("RGB"))
            assert_box_drawn(picture, expected_box(raw_box))
        except (requests.RequestException, OSError, AssertionError):
            return None
        return [picture]  # truthy for the wait, whatever the array holds

    picture = WebDriverWait(browser, 30, poll_frequency=0.5).until(drawn_picture)[0]
    assert picture.shape == (640, 480, 3)
    assert_box_drawn(picture, expected_box(raw_box))
    shot = tmp_path / "web-demo.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("GETOK_WEB_SCREENSHOT"):  # refresh the documentation's screenshot
        shutil.copyfile(shot, os.environ["GETOK_WEB_SCREENSHOT"])
