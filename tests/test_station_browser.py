"""Issue 13, acceptance 3, in a real browser (Debian's chromium via playwright, headless): the operator drives
the station screen (code, start, stop) while the IMU streams on a serial line, and the answer is shown; the
same trial appears on the hub's trial page with its signal and phases, a clinician labels it, the label
comes out of `edgekit labels export`, and the fall-screening table recipe retrains with it."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest
from test_hub_browser import ARGS, CHROMIUM, review_hub
from test_hub_ingest import wait_for
from test_station import IMU, RATE, serial_station, trial_lines

from edgekit.datasets import read_ipol
from edgekit.hub import export_labels
from edgekit.hub.db import HubDB

pytestmark = [pytest.mark.browser, pytest.mark.broker, pytest.mark.data, pytest.mark.torch, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def test_a_trial_from_the_station_screen_to_the_clinicians_label_and_back_into_training(
        trial_bundles, mosquitto, data_dir, tmp_path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not found at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    pytest.importorskip("serial", reason="the serial extra (pyserial) is not installed")
    from edgekit.agent import Agent

    with review_hub(mosquitto, tmp_path, "dr-lee") as (db_url, base):
        trial_file = data_dir / "ipol_gait" / "GaitData" / "11-2_lb.txt"
        cfg, sensor, screen_url = serial_station(trial_bundles["fall_screening"], tmp_path / "o.db", mosquitto.url,
                                                 trial_file)
        try:
            with Agent(cfg) as agent, sync_api.sync_playwright() as p:
                runner = threading.Thread(target=agent.run, kwargs={"drain_timeout_s": 20}, daemon=True)
                runner.start()
                wait_for(lambda: agent.transport.connected and agent.trials is not None, 20, "the agent to start")
                browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
                # the station: a tablet-sized screen on the device
                station = browser.new_page(viewport={"width": 800, "height": 900})
                wait_for(lambda: _opens(station, screen_url), 20, "the station screen")
                station.fill("#participant", "GH-42")
                station.fill("#age", "79")
                station.select_option("#sex", "F")
                station.click("#start")
                station.wait_for_selector("#status.recording", timeout=10_000)
                assert station.is_disabled("#start") and station.is_enabled("#stop")
                sensor.send(trial_lines(trial_file))
                station.wait_for_function("parseFloat(document.querySelector('#status').textContent.split(': ')[1]) > "
                                          f"{len(read_ipol(trial_file).values) / RATE:.1f}", timeout=30_000)
                station.click("#stop")
                station.wait_for_selector("#answer[class]", state="visible", timeout=30_000)
                outcome = station.inner_text("#outcome")
                assert outcome in ("Referred for review", "No referral needed"), outcome
                assert station.locator("#words li").count() >= 1
                assert "GH-42" in station.inner_text("#detail")
                station.screenshot(path=str(tmp_path / "station.png"), full_page=True)

                # the hub: the clinician finds the trial, sees its signal and phases, and labels it
                with HubDB(db_url) as db:
                    wait_for(lambda: db.count_trials() == 1, 30, "the trial at the hub")
                    (stored,) = db.trials(limit=5)
                trial_id = stored["id"]
                clinic = browser.new_page(viewport={"width": 1280, "height": 1000})
                clinic.goto(f"{base}/trials")
                clinic.fill("input[name=name]", "dr-lee")
                clinic.fill("input[name=password]", "correct horse")
                clinic.click("button[type=submit]")
                clinic.wait_for_url(f"{base}/trials")
                clinic.click(f"a[href='/trials/{trial_id}']")
                clinic.wait_for_selector("#trial-signal")
                assert clinic.locator("#trial-signal polyline").count() == len(IMU)
                assert clinic.locator(".phase-band").count() >= 2  # walk out, turn, walk back where found
                assert clinic.locator("#trial-features tr[data-feature=pse] .percentile").count() == 1
                clinic.screenshot(path=str(tmp_path / "trial.png"), full_page=True)
                label = "faller" if stored["summary"]["answer"]["label"] != "faller" else "non_faller"
                clinic.check(f"#trial-label input[name=label][value={label}]")
                clinic.fill("#trial-label textarea[name=note]", "fell at home within 6 months")
                clinic.click("#save-label")
                clinic.wait_for_selector("#trial-labelled")
                assert "dr-lee" in clinic.inner_text("#trial-labelled") and label in clinic.inner_text("#trial-labelled")
                # a clinician on a phone: the same page without sideways scrolling
                clinic.set_viewport_size({"width": 390, "height": 844})
                clinic.reload()
                clinic.wait_for_selector("#trial-signal")
                assert clinic.evaluate("document.documentElement.scrollWidth") <= 390
                station.set_viewport_size({"width": 390, "height": 844})
                assert station.evaluate("document.documentElement.scrollWidth") <= 390
                browser.close()
                agent.stop.set()
                runner.join(60)
        finally:
            sensor.close()

    # the label leaves the hub with the trial's features, and the table recipe trains with it
    out = tmp_path / "labels.csv"
    assert export_labels(db_url, out) == 1
    with out.open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["label"] == label and row["reviewer"] == "dr-lee" and float(row["pse"]) > 0
    from edgekit.contract.run import read_run
    from edgekit.exporters.training.train import train

    run = train(ROOT / "edgekit" / "recipes" / "fall_screening.toml", tmp_path / "run", extra_labels=out,
                epochs=2, progress=False)
    assert read_run(run).extra_labels_added == 1


def _opens(page, url: str) -> bool:
    try:
        page.goto(url)
        return True
    except Exception:
        return False
