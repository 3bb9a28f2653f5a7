"""The dashboard in headless Chromium (Debian's chromium + chromedriver, driven by Selenium):
sign in, submit a digits job from the form, watch the chart gain points live and the state
reach succeeded, then open a feature-map job's view and check that its images loaded."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from tests.factories import train_request
from tests.services import ROOT, TOKEN

SHOTS = ROOT / "tests" / "screenshots"
EPOCHS = 4
# Wide enough that an epoch takes most of a second on one CPU thread, so the stream
# delivers the epochs one by one while the job runs.
SPEC = {"input_shape": [1, 8, 8], "num_classes": 10, "layers": [
    {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1}, {"type": "relu"},
    {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1}, {"type": "relu"},
    {"type": "maxpool2d", "kernel_size": 2}, {"type": "flatten"},
    {"type": "linear", "out_features": 10}]}

# Records (state, chart points) each time the page changes, from inside the page, so that no
# intermediate step is missed between two WebDriver round trips.
RECORDER = """
window.__seen = [];
const snap = () => {
  const badge = document.querySelector('h1 .state');
  const chart = document.getElementById('chart-loss');
  const s = [badge ? badge.dataset.state : null, chart ? Number(chart.dataset.points) : null];
  const last = window.__seen[window.__seen.length - 1];
  if (!last || last[0] !== s[0] || last[1] !== s[1]) window.__seen.push(s);
};
new MutationObserver(snap).observe(document.body, {subtree: true, childList: true,
  attributes: true, attributeFilter: ['data-points', 'data-state']});
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "run scripts/ensure-browser.sh (Debian chromium, chromium-driver)"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1100",
                f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    b = webdriver.Chrome(options=opts, service=Service(executable_path=driver))
    b.set_script_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield b
    finally:
        b.quit()


def wait_for(check: Callable[[], Any], timeout: float = 120, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"gave up waiting for {what or check}")


def js(b: webdriver.Chrome, script: str) -> Any:
    return b.execute_script(script)


def page_state(b: webdriver.Chrome) -> str | None:
    return js(b, "const e = document.querySelector('h1 .state'); return e && e.dataset.state")


def test_dashboard_submits_a_job_charts_it_live_and_shows_feature_maps(stack, browser):
    b = browser
    b.get(stack.url + "/")
    # No token yet: the page asks for one and keeps it.
    wait_for(lambda: js(b, "return document.getElementById('login').open"), 30, "login dialog")
    b.find_element(By.ID, "token-input").send_keys(TOKEN)
    b.find_element(By.ID, "token-save").click()
    wait_for(lambda: not js(b, "return document.getElementById('login').open"), 30, "sign-in")
    assert js(b, "return localStorage.getItem('convoy.token')") == TOKEN
    b.save_screenshot(str(SHOTS / "1-jobs.png"))

    b.find_element(By.ID, "new-job").click()
    wait_for(lambda: b.find_elements(By.ID, "f-spec"), 30, "submit form")
    name = b.find_element(By.ID, "f-name")
    name.clear()
    name.send_keys("browser-digits")
    for field, value in (("f-epochs", EPOCHS), ("f-batch", 32), ("f-lr", 0.05)):
        js(b, f"document.getElementById('{field}').value = '{value}'")
    b.find_element(By.CSS_SELECTOR, "#f-device option[value='cpu']").click()
    spec = b.find_element(By.ID, "f-spec")  # a pasted spec, as a user would
    spec.clear()
    spec.send_keys(json.dumps(SPEC))
    assert b.find_element(By.ID, "f-model").get_attribute("value") == "custom"
    b.save_screenshot(str(SHOTS / "2-submit.png"))
    js(b, RECORDER)
    b.find_element(By.ID, "f-submit").click()

    job_id = wait_for(lambda: "#/jobs/" in b.current_url and b.current_url.rsplit("/", 1)[1],
                      30, "the job page")
    wait_for(lambda: page_state(b) in ("running", "succeeded"), 120, "running")
    wait_for(lambda: page_state(b) == "succeeded", 180, "succeeded")
    wait_for(lambda: b.find_element(By.ID, "val-accuracy").text.endswith("%"), 30, "result")
    seen = js(b, "return window.__seen")
    points = [p for _, p in seen if p]
    assert points == sorted(points) and points[-1] == EPOCHS, seen
    # Live: the chart had some but not all epochs while the job was still running.
    assert any(state == "running" and 0 < (p or 0) < EPOCHS for state, p in seen), seen
    assert js(b, "return document.getElementById('chart-accuracy').dataset.points") == str(EPOCHS)
    assert float(b.find_element(By.ID, "val-accuracy").text.rstrip("%")) > 80
    assert len(b.find_elements(By.CSS_SELECTOR, "#summary tbody tr")) == len(SPEC["layers"])
    with stack.client() as api:  # as many rows as retention kept (the last 3 and the best)
        kept = len(api.get(f"/v1/jobs/{job_id}/checkpoints").json())
    assert 3 <= kept <= EPOCHS
    wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#checkpoints tbody tr")) == kept,
             30, "checkpoint rows")
    b.save_screenshot(str(SHOTS / "3-train-job.png"))

    # Feature maps of the trained model for digits 0, 1, 2.
    b.find_element(By.ID, "extract").click()
    wait_for(lambda: b.current_url.rsplit("/", 1)[1] not in (job_id, ""), 30, "fm job page")
    wait_for(lambda: page_state(b) == "succeeded", 180, "feature-map job succeeded")

    def images_loaded() -> int:
        return js(b, """const imgs = [...document.querySelectorAll('#feature-maps img.fm')];
            return imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)
              ? imgs.length : 0""")

    spatial = 5  # conv, relu, conv, relu, maxpool: the [N, C, H, W] layers
    assert wait_for(images_loaded, 60, "feature-map images") == 3 * spatial
    layers = b.find_elements(By.CSS_SELECTOR, "#feature-maps .fm-layer")
    assert len(layers) == len(SPEC["layers"])
    b.execute_script("document.getElementById('feature-maps').scrollIntoView()")
    b.save_screenshot(str(SHOTS / "4-feature-maps.png"))

    b.get(stack.url + "/#/")
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, f"#jobs tr[data-id='{job_id}']"), 30,
             "the job in the list")
    row = b.find_element(By.CSS_SELECTOR, f"#jobs tr[data-id='{job_id}']")
    assert "succeeded" in row.text and "browser-digits" in row.text
    b.save_screenshot(str(SHOTS / "5-jobs.png"))

    # The cancel button stops a running job; the page follows it to canceled.
    with stack.client() as api:
        long_id = api.post("/v1/jobs", json=train_request(500)).json()["id"]
    b.get(f"{stack.url}/#/jobs/{long_id}")
    wait_for(lambda: page_state(b) == "running", 120, "long job running")
    b.find_element(By.ID, "cancel").click()
    wait_for(lambda: page_state(b) == "canceled", 60, "canceled")
    assert not b.find_element(By.ID, "cancel").is_displayed()


def test_invariance_job_page_draws_a_curve_per_layer_and_one_by_depth(stack, browser):
    b = browser
    with stack.client() as api:
        r = api.post("/v1/jobs", json={
            "kind": "invariance", "source": {"model": SPEC, "seed": 0}, "device": "cpu",
            "inputs": {"dataset": "digits", "indices": list(range(8))},
            "transforms": {"translate": [1, 2, 3], "scale": [0.8, 1.25]}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    b.get(stack.url + "/")
    js(b, f"localStorage.setItem('convoy.token', '{TOKEN}')")
    b.get(f"{stack.url}/#/jobs/{job_id}")
    b.refresh()  # the first load asked for the token: load again with it
    wait_for(lambda: page_state(b) == "succeeded", 120, "invariance job succeeded")
    assert not js(b, "return document.getElementById('login').open")

    def chart(element_id: str) -> tuple[str, str] | None:
        return js(b, f"""const e = document.getElementById('{element_id}');
            return e && e.querySelector('canvas') ? [e.dataset.points, e.dataset.series] : null""")

    # distance by magnitude: a point per magnitude, a line per layer, for each family asked
    assert wait_for(lambda: chart("inv-translate"), 30, "translate chart") == [
        "3", str(len(SPEC["layers"]))]
    assert chart("inv-scale") == ["2", str(len(SPEC["layers"]))]
    assert chart("inv-rotate") is None
    # distance by depth at the chosen magnitude: a point per layer
    assert chart("inv-depth") == [str(len(SPEC["layers"])), "1"]
    options = js(b, "return [...document.querySelectorAll('#inv-magnitude option')]"
                    ".map(o => o.textContent)")
    assert options == ["translate 1 pixels", "translate 2 pixels", "translate 3 pixels",
                       "scale 0.8 scale factor", "scale 1.25 scale factor"]
    rows = b.find_elements(By.CSS_SELECTOR, "#inv-output tbody tr")
    assert len(rows) == 5 and rows[0].text.startswith("translate 1")
    b.execute_script("document.getElementById('invariance').scrollIntoView()")
    b.save_screenshot(str(SHOTS / "6-invariance.png"))
