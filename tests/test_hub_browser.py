"""The review station in a real browser (Debian's chromium via playwright, headless, no downloads): results
arrive over a real mosquitto, a reviewer logs in, opens the queue and a case, sees the plot and the reasons,
and labels it; the label is in the database with the reviewer's name and in the export."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


T0 = 1583750073.0  # 2020-03-09 10:34:33: a replayed recording's own time (sensor time), not the hub's clock
PHONE = {"width": 390, "height": 844}


def png_width(path: Path) -> int:
    """The pixel width a PNG's header gives (a full-page screenshot is as wide as the page's content)."""
    return struct.unpack(">I", path.read_bytes()[16:20])[0]


def no_sideways_scroll(page, path: Path) -> None:
    """The page fits a 390 px phone: nothing is wider than the viewport, in the DOM and in the full-page
    screenshot."""
    page.screenshot(path=str(path), full_page=True)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[2] and widths[1] <= widths[2], (path.name, widths)
    assert png_width(path) == PHONE["width"], (path.name, png_width(path))


@contextlib.contextmanager
def review_hub(mosquitto: Any, tmp_path: Path, reviewer: str) -> Iterator[tuple[str, str]]:
    """A hub (ingest and web on a free port, SQLite) with one reviewer whose password is "correct horse",
    subscribed before it yields (its database URL, its base URL); stopped, and checked stopped, after."""
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    add_user(db_url, reviewer, "correct horse")
    port = free_port()
    stop = threading.Event()
    hub = threading.Thread(target=run_hub, args=(mosquitto.url, db_url),
                           kwargs={"http": f"127.0.0.1:{port}", "stop": stop}, daemon=True)
    hub.start()
    try:
        hub_listening(db_url, mosquitto.port)
        yield db_url, f"http://127.0.0.1:{port}"
    finally:
        stop.set()
        hub.join(timeout=30)
    assert not hub.is_alive()


@pytest.mark.browser
@pytest.mark.broker
def test_reviewer_labels_an_incident_in_the_browser_on_a_phone(mosquitto, tmp_path):
    """Issue 15, acceptance 2 (and 3): deferred windows arrive over a real mosquitto; the queue shows one incident
    with the recording's own dates; the reviewer opens it on a 390 px phone, sees the signal, the reasons in
    plain words, labels it with the keyboard (2, Enter), and every window carries the label with who and when;
    one window is relabelled on its own page. Queue, incident and window pages fit the phone."""
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not found at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with review_hub(mosquitto, tmp_path, "ana") as (db_url, base):
        pub = publisher(mosquitto.port)
        res = [result("edge-7", s, site="clinic", start_s=T0 + 2.0 * s, end_s=T0 + 2.0 * s + 2) for s in range(1, 21)]
        msgs = [(topics.topic("clinic", "edge-7", "result"), m.ResultBatch("clinic", "edge-7", res).encode())]
        msgs += [(topics.topic("clinic", "edge-7", "review"), review(r).encode()) for r in res if r.decision == "defer"]
        publish_all(pub, msgs)
        pub.disconnect()
        pub.loop_stop()
        windows = [r.id for r in res if r.decision == "defer"]  # seq 5, 10, 15, 20: 8 s apart, one incident
        with HubDB(db_url) as db:
            wait_for(lambda: all((db.case(w) or {}).get("signal") for w in windows), 20, "the reviews")

        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
            page = browser.new_page(viewport=PHONE)
            page.goto(f"{base}/queue")
            page.fill("input[name=name]", "ana")
            page.fill("input[name=password]", "correct horse")
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/queue")
            links = page.locator("a.incident-link")
            assert links.count() == 1
            assert "1 incident waiting" in page.locator("#queue-totals").inner_text()
            assert "2020-03-09 10:34:43 – 10:35:15" in page.locator("li.incident .when").inner_text()
            no_sideways_scroll(page, tmp_path / "queue-390.png")
            links.first.click()
            page.wait_for_selector("#incident-signal-narrow")
            assert page.locator("#incident-signal-narrow").is_visible()
            assert not page.locator("#incident-signal").is_visible()  # the wide plot is for wider screens
            assert "4 deferred windows" in page.locator("#incident-meta").inner_text()
            assert page.locator("#incident-why li[data-reason=low_confidence]").inner_text().startswith(
                "The model was not confident enough.")
            no_sideways_scroll(page, tmp_path / "incident-390.png")
            page.keyboard.press("2")  # the second label choice ...
            assert page.locator("input[name=label][data-key='2']").is_checked()
            page.keyboard.press("Enter")  # ... saved for the whole incident
            page.wait_for_selector("p.saved")
            label = page.locator("input[name=label][data-key='2']").get_attribute("value")
            assert f"Saved: {label} on 4 windows" in page.locator("p.saved").inner_text()
            page.goto(f"{base}/cases/{windows[1]}")
            page.wait_for_selector(".plot.narrow svg.signal")
            assert page.locator("#case-incident").get_attribute("href") == f"/incidents/{windows[0]}"
            no_sideways_scroll(page, tmp_path / "case-390.png")
            page.keyboard.press("1")
            page.keyboard.press("Enter")  # one window relabelled on its own
            page.wait_for_selector("p.saved")
            browser.close()

        with HubDB(db_url) as db:
            history = {w: db.case(w)["labels"] for w in windows}
        for w in windows:
            first = history[w][-1]  # the incident's label, kept under any relabel
            assert (first["label"], first["reviewer"]) == (label, "ana") and first["labelled_at"] > 0
        assert len({history[w][-1]["labelled_at"] for w in windows}) == 1  # one label, one time, every window
        assert len(history[windows[1]]) == 2 and history[windows[1]][0]["reviewer"] == "ana"


@pytest.mark.browser
@pytest.mark.broker
def test_reviewer_labels_a_case_in_the_browser(mosquitto, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium not found at /usr/bin/chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    with review_hub(mosquitto, tmp_path, "ana") as (db_url, base):
        pub = publisher(mosquitto.port)
        res = [result("edge-7", s, site="clinic") for s in range(1, 21)]
        # window 15: the input envelope named a channel, and the autoencoder's error is attributed (issue 14)
        res[14] = dataclasses.replace(res[14], reasons=["low_confidence", "disagreement", "ood", "out_of_range:acc_x"],
                                      attribution={"acc_x": 0.7, "gyro_z": 0.2, "acc_y": 0.1})
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
            assert page.locator("a.incident-link").count() == 1  # seq 5, 10, 15, 20 deferred: one incident
            page.goto(f"{base}/cases/{case_id}")  # one of its windows
            page.wait_for_selector("svg.signal")
            assert page.locator(".plot.wide svg.signal polyline").count() == 3
            box = page.locator(".plot.wide svg.signal").bounding_box()
            assert box and box["width"] > 600 and box["height"] > 200
            reasons = page.locator("p.reasons .reason").all_inner_texts()
            assert reasons == ["low_confidence", "disagreement", "ood", "out_of_range:acc_x"]
            assert "acc_x" in page.locator("#case-reasons li[data-reason='out_of_range:acc_x']").inner_text()
            shares = page.locator("#case-attribution tr").all_inner_texts()
            assert [t.split()[0] for t in shares] == ["acc_x", "gyro_z", "acc_y"] and "70 %" in shares[0]
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
        assert row["reasons"] == "low_confidence;disagreement;ood;out_of_range:acc_x"
        assert row["attribution"] == "acc_x=0.700;gyro_z=0.200;acc_y=0.100"
