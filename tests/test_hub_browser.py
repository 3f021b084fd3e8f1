"""The review station in a real browser (Debian's chromium via playwright, headless, no downloads): results
arrive over a real mosquitto, a reviewer logs in, opens the queue and a case, sees the plot and the reasons,
and labels it; the label is in the database with the reviewer's name and in the export."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import pytest
from messagefactory import result, review
from test_hub_ingest import hub_listening, publish_all, publisher, wait_for

from edgekit import topics
from edgekit.broker import free_port
from edgekit.contract import messages as m
from edgekit.hub import add_user, export_labels, run_hub
from edgekit.hub.db import HubDB

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.mark.browser
@pytest.mark.broker
def test_reviewer_labels_a_case_in_the_browser(mosquitto, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not found at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(db_url, "ana", "correct horse")
    port = free_port()
    stop = threading.Event()
    hub = threading.Thread(target=run_hub, args=(mosquitto.url, db_url),
                           kwargs={"http": f"127.0.0.1:{port}", "stop": stop}, daemon=True)
    hub.start()
    try:
        hub_listening(db_url, mosquitto.port)
        pub = publisher(mosquitto.port)
        res = [result("edge-7", s, site="clinic") for s in range(1, 21)]
        msgs = [(topics.topic("clinic", "edge-7", "result"), m.ResultBatch("clinic", "edge-7", res).encode())]
        msgs += [(topics.topic("clinic", "edge-7", "review"), review(r).encode()) for r in res if r.decision == "defer"]
        msgs.append((topics.topic("clinic", "edge-7", "status"),
                     m.Status("clinic", "edge-7", "online", res[-1].ts, model_version="gait-cnn@3", queued=0,
                              dropped=0).encode()))
        publish_all(pub, msgs)
        pub.disconnect()
        pub.loop_stop()
        case_id = topics.result_id("edge-7", 15)
        with HubDB(db_url) as db:
            wait_for(lambda: (db.case(case_id) or {}).get("signal") is not None, 20, "the review of the case")

        base = f"http://127.0.0.1:{port}"
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{base}/queue")
            assert "/login" in page.url  # not logged in: sent to the login page
            page.fill("input[name=name]", "ana")
            page.fill("input[name=password]", "correct horse")
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/queue")
            page.screenshot(path=str(tmp_path / "queue.png"), full_page=True)
            links = page.locator("a.case-link")
            assert links.count() == 4  # seq 5, 10, 15, 20 were deferred
            assert links.first.inner_text() == topics.result_id("edge-7", 20)  # newest first
            page.click(f"a.case-link:text('{case_id}')")
            page.wait_for_selector("svg.signal")
            assert page.locator("svg.signal polyline").count() == 3
            box = page.locator("svg.signal").bounding_box()
            assert box and box["width"] > 600 and box["height"] > 200
            reasons = page.locator("p.reasons .reason").all_inner_texts()
            assert reasons == ["low_confidence", "disagreement"]
            assert page.locator("table.gate tr.fail").count() == 2  # confidence and disagreement
            assert page.locator("table.features td", has_text="cadence_hz").count() == 1
            page.screenshot(path=str(tmp_path / "case.png"), full_page=True)
            page.check("input[name=label][value=turn]")
            page.fill("textarea[name=note]", "turning at the end of the walkway")
            page.click("form.label button[type=submit]")
            page.wait_for_selector("p.saved")
            assert "turn" in page.locator("p.saved").inner_text()
            page.screenshot(path=str(tmp_path / "saved.png"), full_page=True)
            page.goto(f"{base}/fleet")
            assert page.locator("span.state.online").count() >= 1
            page.screenshot(path=str(tmp_path / "fleet.png"), full_page=True)
            browser.close()

        with HubDB(db_url) as db:
            [label] = db.case(case_id)["labels"]
        assert (label["label"], label["reviewer"], label["note"]) == ("turn", "ana", "turning at the end of the walkway")
        out = tmp_path / "labels.csv"
        assert export_labels(db_url, out) == 1
        [row] = list(csv.DictReader(out.open()))
        assert (row["result_id"], row["label"], row["reviewer"]) == (case_id, "turn", "ana")
    finally:
        stop.set()
        hub.join(timeout=30)
    assert not hub.is_alive()
