"""The dashboard's sweep pages in headless Chromium (issue 20): the list, the trials table and
one chart per parameter of the objective against its values, for a finished sweep."""

from __future__ import annotations

import time

from selenium.webdriver.common.by import By

from tests.factories import digits_cnn, train_request
from tests.services import TOKEN
from tests.ui.test_browser import browser, js, page_state, wait_for

__all__ = ["browser"]  # the fixture, used by name below


def test_sweep_page_shows_trials_and_objective_per_parameter(stack, client, browser):
    base = train_request(1, model=digits_cnn(4))
    space = {"train.lr": {"type": "float", "low": 0.01, "high": 0.3, "log": True},
             "train.batch_size": {"type": "categorical", "choices": [32, 64]}}
    r = client.post("/v1/sweeps", json={"name": "ui-sweep", "base": base, "space": space,
                                        "trials": 3, "parallel": 1, "sampler": "random"})
    assert r.status_code == 201, r.text
    sweep_id = r.json()["id"]
    deadline = time.monotonic() + 180
    while client.get(f"/v1/sweeps/{sweep_id}").json()["state"] == "running":
        assert time.monotonic() < deadline, "sweep still running"
        time.sleep(0.3)
    sweep = client.get(f"/v1/sweeps/{sweep_id}").json()
    assert sweep["state"] == "succeeded"

    b = browser
    b.get(stack.url + "/")
    js(b, f"localStorage.setItem('convoy.token', '{TOKEN}')")
    b.get(stack.url + "/#/sweeps")
    b.refresh()
    wait_for(lambda: b.find_elements(By.CSS_SELECTOR, f"#sweeps tr[data-id='{sweep_id}']"), 30,
             "the sweep in the list")
    b.find_element(By.CSS_SELECTOR, f"#sweeps tr[data-id='{sweep_id}']").click()
    wait_for(lambda: page_state(b) == "succeeded", 30, "the sweep's page")
    rows = wait_for(lambda: len(b.find_elements(By.CSS_SELECTOR, "#trials tbody tr")) == 3
                    and b.find_elements(By.CSS_SELECTOR, "#trials tbody tr"), 30, "trials")
    for row, trial in zip(rows, sweep["trials"], strict=True):
        assert trial["job_id"][:8] in row.text
        assert f"train.lr={trial['params']['train.lr']}" in row.text
    charts = wait_for(lambda: b.find_elements(By.CSS_SELECTOR, "#sweep-charts .param-chart"),
                      30, "charts")
    assert sorted(c.get_attribute("data-param") for c in charts) == sorted(space)
    # every trial with a value is a point on each parameter's chart, drawn by uPlot
    with_value = sum(t["value"] is not None for t in sweep["trials"])
    assert [c.get_attribute("data-points") for c in charts] == [str(with_value)] * 2
    assert all(c.find_elements(By.CSS_SELECTOR, "canvas") for c in charts)
