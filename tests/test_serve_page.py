"""The chat page at / in headless Chromium (selenium): upload the demo image, ask, read the streamed answer from the
page, which equals the server's answer to the same request; a screenshot goes under the test's tmp dir.

Chromium and its driver are Debian's `chromium` + `chromium-driver`; like tests/test_slurm_cluster.py installs Slurm,
the set-up installs them with apt-get when they are missing (root), and skips with the reason when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess

import openai
import pytest

from tests.test_serve_support import API_KEY, MODEL_NAME, Server, build_export, data_url, demo_png, model_args, user

pytestmark = pytest.mark.slow
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1000,900",
)  # fmt: skip


def _browser() -> tuple[str, str]:
    """(chromium, chromedriver) paths, installed with apt-get if missing; pytest.skip with the reason otherwise."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    if os.geteuid() != 0:
        pytest.skip("chromium / chromium-driver are not installed and installing them with apt-get needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("chromium / chromium-driver are not installed and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium",
                            "chromium-driver"], env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("installing chromium / chromium-driver with apt-get took over 15 min (no package mirror?)")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if r.returncode != 0 or not all(found):
        pytest.skip(f"could not install chromium / chromium-driver with apt-get: {r.stderr.strip()[-500:]}")
    return found


@pytest.fixture(scope="module")
def server(tiny_dirs, tmp_path_factory):
    export = build_export(tiny_dirs, tmp_path_factory.mktemp("page_export"))
    args = model_args(tiny_dirs, export) + ["--max-tokens", "12"]
    srv = Server(args, tmp_path_factory.mktemp("page_log") / "server.log", env={"PILL_SERVE_API_KEY": API_KEY})
    yield srv
    srv.stop()


@pytest.fixture
def driver(tmp_path):
    chromium, chromedriver = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.binary_location = chromium
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for drivers online
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    yield drv
    drv.quit()


def test_chat_page_streams_the_answer(server, driver, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "demo.png"
    image.write_bytes(demo_png())
    question = "What colour is the shape?"
    driver.get(server.url + "/")
    assert MODEL_NAME in driver.find_element(By.ID, "model").text
    driver.find_element(By.ID, "key").send_keys(API_KEY)
    driver.find_element(By.ID, "image").send_keys(str(image))
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "preview").get_attribute("src").startswith("data:"))
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "send").click()
    done = WebDriverWait(driver, 180).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant span[data-done='true']")
        or d.find_element(By.ID, "status").text
    )
    driver.save_screenshot(str(tmp_path / "chat.png"))
    assert isinstance(done, list), f"the page reported: {done}"
    answer = done[0].get_attribute("textContent")
    assert int(done[0].get_attribute("data-chunks")) >= 2  # shown piece by piece as the events came

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    expected = client.chat.completions.create(model=MODEL_NAME, messages=user(question, data_url(image.read_bytes())))
    assert answer == expected.choices[0].message.content and answer
    assert (tmp_path / "chat.png").stat().st_size > 1000
    assert len(driver.find_elements(By.CSS_SELECTOR, ".user img")) == 1  # the uploaded image shows in the log
