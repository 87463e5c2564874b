"""The live dashboard: its figures from planted requests, the gateway's routes, and the page in a
real headless Chromium (driven over the DevTools protocol) while load runs."""
from __future__ import annotations

import base64
import json
import math
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import pytest

from reports.ablation import PAPER_ACCURACY_LOSS_PP, PAPER_LATENCY_REDUCTION_PCT
from targets.serving import live
from targets.serving.live import Z95_ONE_SIDED, LABEL_HEADER, LiveState, paper_tau, parse_answer, wilson_interval

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def answer(actions, predicted, j=None, tau=None, rejected=False, binary=False, **extra) -> tuple[bytes, str | None]:
    """An infer answer body as the gateway writes it (one row: scalars; n rows: joined strings)."""
    n = len(actions)
    admitted = [a == "full" for a in actions]
    j = j or [0.5] * n
    tau = tau or [0.7] * n
    if n == 1:
        parameters = {"admitted": admitted[0], "action": actions[0], "j": j[0], "tau": tau[0], "u": 0.1, **extra}
    else:
        parameters = {"admitted": ",".join("true" if a else "false" for a in admitted), "action": ",".join(actions),
                      "j": ",".join(map(str, j)), "tau": ",".join(map(str, tau)), **extra}
    if rejected:
        return json.dumps({"error": "request not admitted by the controller", "parameters": parameters}).encode(), None
    probabilities = np.full((n, 10), 0.01, dtype=np.float32)
    for i, p in enumerate(predicted):
        probabilities[i, p] = 0.91
    output = {"name": "probabilities", "datatype": "FP32", "shape": [n, 10]}
    if binary:
        header = json.dumps({"outputs": [output], "parameters": parameters}).encode()
        return header + probabilities.tobytes(), str(len(header))
    output["data"] = probabilities.ravel().tolist()
    return json.dumps({"outputs": [output], "parameters": parameters}).encode(), None


def controller_state(policy=None, tau=0.7, **config):
    state = {"t_s": 0.0, "tau": tau, "energy_norm": 0.2, "congestion": 0.1, "energy_source": "none",
             "config": {"tau0": 1.75, "tau_inf": 0.7, "k_per_s": 1.0, "slo_ms": 50.0, **config}}
    if policy is not None:
        state["policy"] = policy
    return lambda: state


# --- the figures, from planted requests ---------------------------------------------------------------
def test_paper_targets_agree_with_the_reports():
    assert live.PAPER_LATENCY_REDUCTION_PCT == PAPER_LATENCY_REDUCTION_PCT
    assert live.PAPER_ACCURACY_LOSS_PP == PAPER_ACCURACY_LOSS_PP


def test_answers_parse_in_json_binary_and_batch_form():
    rows, rejected = parse_answer(*answer(["full"], [3]))
    assert not rejected and len(rows) == 1
    assert (rows[0].action, rows[0].admitted, rows[0].predicted, rows[0].j) == ("full", True, 3, 0.5)
    rows, _ = parse_answer(*answer(["exit", "full", "exit"], [1, 2, 7], j=[0.9, 0.2, 1.1], binary=True))
    assert [r.predicted for r in rows] == [1, 2, 7] and [r.admitted for r in rows] == [False, True, False]
    assert [r.j for r in rows] == [0.9, 0.2, 1.1]
    rows, rejected = parse_answer(*answer(["reject"], [0], rejected=True))
    assert rejected and rows[0].action == "reject" and rows[0].predicted is None
    rows, _ = parse_answer(*answer(["exit", "exit"], [1, 1], exit="0,2"))  # a ladder says where rows left
    assert [r.exit_index for r in rows] == [0, 2]
    for junk in (b"", b"not json", b"[1, 2]", b'{"outputs": [{"shape": [1, 10], "data": "x"}]}'):
        assert parse_answer(junk, None)[0] == []  # never an exception
    assert parse_answer(b"{}", "999")[0] == []


def test_planted_requests_give_exact_rates_percentiles_and_accuracy(clock):
    state = LiveState("digits", "cpu", controller_state=controller_state(), slo_ms=50.0,
                      reference_accuracy=(0.99, "planted"), window_s=5.0, clock=clock)
    latencies = np.arange(1, 101, dtype=float)  # 100 requests in the first second: 1..100 ms
    for i, latency in enumerate(latencies):
        if i % 10 == 0:  # 10 rejected
            body, header = answer(["reject"], [0], rejected=True)
            state.observe(503, latency, body, header, labels="4")
        else:  # 90 answered, a third of them admitted; predicted 4 unless i % 9 == 0
            action = "full" if i % 3 == 0 else "exit"
            body, header = answer([action], [4 if i % 9 else 5])
            state.observe(200, latency, body, header, labels="4")
    state.observe(400, 0.3)  # bad input: counted, not served
    state.observe(503, 2.0, b'{"error": "inference backend unavailable"}')  # a failure, not a rejection
    clock.advance(2.0)
    snapshot = state.snapshot()
    (point,) = snapshot["points"]
    assert point["rps"] == pytest.approx(102 / 2.0) and point["answered_rps"] == pytest.approx(45.0)
    assert point["rejected_rps"] == pytest.approx(5.0) and point["failed_rps"] == pytest.approx(0.5)
    assert point["shed_rate"] == pytest.approx(10 / 100)
    assert point["window_n"] == 100
    assert point["p50_ms"] == pytest.approx(np.percentile(latencies, 50))
    assert point["p95_ms"] == pytest.approx(np.percentile(latencies, 95))
    admitted = sum(1 for i in range(100) if i % 10 and i % 3 == 0)
    assert point["admission_rate"] == pytest.approx(admitted / 100)  # rejections are decisions too
    assert point["exit_depth_mean"] == pytest.approx((90 + admitted) / 90)  # rejections ran no answer
    correct = sum(1 for i in range(100) if i % 10 and i % 9)
    totals = snapshot["totals"]
    assert (totals["scored"], totals["correct"]) == (100, correct)  # rejections scored as wrong
    assert totals["exit_depth_counts"] == {"1": 90 - admitted, "2": admitted}
    assert point["tau"] == [0.7]
    accuracy_line = snapshot["verdict"][2]
    assert accuracy_line["value"] == pytest.approx(100 * (0.99 - correct / 100))
    low, high = wilson_interval(correct, 100, z=Z95_ONE_SIDED)  # one-sided 95 % bounds, as the report decides
    assert accuracy_line["interval_pp"] == pytest.approx([100 * (0.99 - high), 100 * (0.99 - low)])
    assert accuracy_line["status"] == "not_held"  # 81 % vs 99 %: the whole interval is past 0.5 pp
    assert snapshot["verdict"][0]["status"] == "not_held"  # p95 of 1..100 ms > 50 ms
    assert snapshot["verdict"][1]["status"] == "unknown"  # no standard run at hand
    # The window slides: 6 s later, nothing is left in it.
    clock.advance(6.0)
    later = state.snapshot(since=point["seq"])
    assert [p["window_n"] for p in later["points"]] == [0] and later["points"][0]["p95_ms"] is None
    assert later["verdict"][0]["status"] == "unknown"


def test_energy_is_shown_with_its_source_or_as_unknown(clock):
    feed = {"last_j_per_request": 0.01, "energy_source": "estimated:codecarbon", "energy_j_total": 3.0,
            "co2_g_total": 0.001, "co2_source": "estimated:codecarbon"}
    state = LiveState("digits", "cpu", energy=lambda: feed, clock=clock)
    clock.advance(1.0)
    snapshot = state.snapshot()
    assert snapshot["energy"]["energy_source"] == "estimated:codecarbon"
    assert snapshot["points"][0]["energy_j_per_request"] == 0.01 and snapshot["points"][0]["co2_g_total"] == 0.001
    without = LiveState("digits", "cpu", energy=lambda: None, clock=clock).snapshot()
    assert without["energy"]["energy_source"] == "none" and "not known" in without["energy"]["note"]


def test_the_counterfactual_recovers_planted_decisions_of_the_paper_formula(clock):
    # A controller under another policy, at t = 0 of its clock: the paper's τ(0) = τ0 = 1.75.
    state = LiveState("digits", "cpu", controller_state=controller_state(policy="budget"), clock=clock)
    # J ≤ 1.75 would all be admitted by the paper's formula; the other policy admitted only J ≤ 0.7.
    js = [0.1, 0.5, 0.9, 1.2, 1.6, 1.9, 2.0]
    for j in js:
        action = "full" if j <= 0.7 else "exit"
        state.observe(200, 1.0, *answer([action], [1], j=[j], tau=[0.7]))
    counterfactual = state.snapshot()["counterfactual"]
    assert counterfactual["known"] and counterfactual["other"] == "paper"
    assert counterfactual["rows"] == 7
    assert counterfactual["more_admitted"] == 3  # 0.9, 1.2, 1.6
    assert counterfactual["fewer_admitted"] == 0
    state.observe(503, 1.0, json.dumps({"error": "shed", "parameters": {"action": "reject"}}).encode())
    assert state.snapshot()["counterfactual"]["shed"] == 1  # the paper's controller never sheds
    # A policy's own state as a dict names the policy too.
    nested = LiveState("digits", "cpu", controller_state=lambda: {"t_s": 0.0, "tau": 0.7,
                                                                   "policy": {"policy": "budget", "ceiling": 0.3},
                                                                   "config": {"tau0": 1.75, "tau_inf": 0.7,
                                                                              "k_per_s": 1.0}}, clock=clock)
    nested.observe(200, 1.0, *answer(["exit"], [1], j=[1.0]))
    snapshot = nested.snapshot()
    assert snapshot["policy"] == "budget" and snapshot["counterfactual"]["more_admitted"] == 1
    # Under the paper's own policy, the other policy's thresholds are not derivable: not known.
    paper = LiveState("digits", "cpu", controller_state=controller_state(), clock=clock)
    paper.observe(200, 1.0, *answer(["full"], [1]))
    assert paper.snapshot()["counterfactual"]["known"] is False
    off = LiveState("digits", "cpu", clock=clock).snapshot()
    assert off["counterfactual"]["known"] is False and off["controller"] == "off"


def test_paper_tau_per_exit():
    assert paper_tau({"tau0": 1.75, "tau_inf": 0.7, "k_per_s": 1.0}, 0.0) == pytest.approx(1.75)
    assert paper_tau({"tau0": 1.75, "tau_inf": 0.7, "k_per_s": 1.0}, 50.0) == pytest.approx(0.7)
    ladder = paper_tau({"tau0": 1.75, "tau_inf": [0.5, 0.6, 0.7], "k_per_s": 2.0}, 1.0)
    assert ladder == pytest.approx([i + (1.75 - i) * math.exp(-2.0) for i in (0.5, 0.6, 0.7)])
    assert paper_tau({"tau0": 1.0}, 1.0) is None


def test_tau_is_a_list_per_exit_when_the_controller_gives_one(clock):
    state = LiveState("m", "cpu", controller_state=controller_state(tau=[0.4, 0.5, 0.6]), clock=clock)
    clock.advance(1.0)
    assert state.snapshot()["points"][0]["tau"] == [0.4, 0.5, 0.6]


# --- the gateway's routes --------------------------------------------------------------------------
def infer(client, x, label=None, **headers):
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if label is not None:
        headers[LABEL_HEADER] = label
    return client.post("/v2/models/digits/infer", json=body, headers=headers)


def test_gateway_serves_the_page_its_files_and_live_state(start_gateway, digits_eval):
    gateway = start_gateway("--controller", "bio", "--slo-ms", "80")
    x, y = digits_eval
    with httpx.Client(base_url=gateway.url) as client:
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        for reference in ("dashboard/static/uPlot.iife.min.js", "dashboard/static/dashboard.js"):
            assert reference in page.text
            assert client.get("/" + reference).status_code == 200
        assert "MIT License" in client.get("/dashboard/static/uPlot.LICENSE").text
        missing = client.get("/dashboard/static/..%2Fgateway.py")
        assert missing.status_code == 404 and "error" in missing.json()
        assert client.get("/dashboard/state?since=x").status_code == 400
        for i in range(40):
            assert infer(client, x[i : i + 1], label=str(int(y[i]))).status_code == 200
        assert infer(client, x[:3], label=",".join(str(int(v)) for v in y[:3])).status_code == 200
        assert client.post("/v2/models/digits/infer", content=b"junk").status_code == 400
        time.sleep(1.1)
        state = client.get("/dashboard/state").json()
    assert state["model"] == "digits" and state["controller"] == "bio" and state["slo_ms"] == 80
    totals = state["totals"]
    assert totals["requests"] == 42 and totals["answered"] == 41 and totals["client_errors"] == 1
    assert totals["scored"] == 43 and 0.9 < totals["correct"] / 43 <= 1  # digits: ~98 % correct
    assert sum(totals["exit_depth_counts"].values()) == 43
    assert state["points"] and state["points"][-1]["tau"][0] > 0
    assert state["energy"]["energy_source"] == "none"  # started with --energy off: never a 0 J figure


def test_serve_then_locust_host_shows_live_figures(start_gateway, tmp_path):
    """The README's flow: a running gateway, `locust -f loadtests/bio.py --host URL`; every request
    the locustfile records is on the dashboard, labelled, so the running accuracy is known."""
    import sys

    gateway = start_gateway("--controller", "bio")
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "locust", "-f", str(root / "loadtests" / "bio.py"), "--headless",
                    "--host", gateway.url, "-u", "2", "-t", "3", "--energy", "off", "--results", str(tmp_path / "bio")],
                   cwd=root, check=True, capture_output=True, timeout=120)
    records = [json.loads(line) for line in (tmp_path / "bio" / "requests.jsonl").read_text().splitlines()]
    state = httpx.get(f"{gateway.url}/dashboard/state").json()
    assert state["totals"]["requests"] == state["totals"]["scored"] == len(records) > 0
    assert state["totals"]["correct"] == sum(r["correct"] for r in records)  # the same scoring as the report
    assert state["points"] and any(p["rps"] > 0 for p in state["points"])


# --- the page in a real browser ------------------------------------------------------------------------
class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, url: str):
        import websocket

        self.socket = websocket.create_connection(url, timeout=30, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self):
        self.socket.close()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with remote debugging on an ephemeral port; killed at the end."""
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--hide-scrollbars", "--window-size=1400,1500", "--remote-debugging-port=0",
         "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
        tools = DevTools(pages[0]["webSocketDebuggerUrl"])
        yield tools
        tools.close()
    finally:
        process.kill()
        process.wait()


def send_load(url: str, x, y, stop: threading.Event, counter: list) -> None:
    """Labelled requests as fast as one client goes, until ``stop``."""
    with httpx.Client(base_url=url) as client:
        i = 0
        while not stop.is_set():
            row = i % len(x)
            infer(client, x[row : row + 1], label=str(int(y[row])))
            counter[0] += 1
            i += 1


PAGE_FIGURES = """(() => {
  const d = window.dashboard, text = (id) => document.getElementById(id).textContent;
  const drawn = {};
  for (const [key, chart] of Object.entries(d.charts)) {
    if (!chart || !chart.data) continue;
    drawn[key] = chart.data.slice(1).map((s) => s.filter((v) => v !== null).length);
  }
  const canvases = [...document.querySelectorAll('.chart canvas')].map((c) => c.toDataURL().length);
  return {updates: d.updates, errors: d.errors, points: d.points.length, drawn, canvases,
          rps: text('v-rps'), latency: text('v-latency'), tau: text('v-tau'), admission: text('v-admission'),
          accuracy: text('v-accuracy'), energy: text('v-energy'), energySource: text('energy-source'),
          energyClass: document.getElementById('energy-source').className, link: text('link'),
          verdict: document.querySelectorAll('#verdict tr').length,
          counterfactual: text('counterfactual'), requests: d.last && d.last.totals.requests};
})()"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian package chromium is not installed: sudo apt-get install chromium (bash tests/run does it where it can)")
def test_dashboard_draws_and_moves_in_headless_chromium(start_gateway, browser, digits_eval):
    energy = os.environ.get("GREEN_MLOPS_DASHBOARD_ENERGY", "off")  # "auto" for the README's screenshot
    gateway = start_gateway("--controller", "bio", "--policy", "paper", "--energy", energy)
    browser.call("Network.enable")
    browser.call("Page.enable")
    browser.call("Page.navigate", url=gateway.dashboard_url)
    stop, counter = threading.Event(), [0]
    load = threading.Thread(target=send_load, args=(gateway.url, *digits_eval, stop, counter), daemon=True)
    load.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            first = browser.evaluate(PAGE_FIGURES if _loaded(browser) else "null")
            if first and first["points"] >= 2 and first["requests"]:
                break
            assert time.monotonic() < deadline, f"the page did not update: {first}"
            time.sleep(0.25)
        time.sleep(3.0)
        second = browser.evaluate(PAGE_FIGURES)
        shot = os.environ.get("GREEN_MLOPS_DASHBOARD_SHOT")
        if shot:  # how docs/dashboard.png is made (see the README)
            time.sleep(float(os.environ.get("GREEN_MLOPS_DASHBOARD_SHOT_AFTER_S", "0")))
            png = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
            Path(shot).write_bytes(base64.b64decode(png["data"]))
    finally:
        stop.set()
        load.join(timeout=10)
    assert counter[0] > 0 and second["errors"] == 0 and second["link"].startswith("live")
    # It updates at least once a second, and its values move while load runs.
    assert second["updates"] - first["updates"] >= 3
    assert second["points"] > first["points"] and second["requests"] > first["requests"]
    assert (second["rps"], second["latency"], second["tau"]) != (first["rps"], first["latency"], first["tau"])
    # Every chart drew its series, and the canvases changed.
    for key in ("throughput", "latency", "tau", "depth", "energy", "co2"):
        assert key in second["drawn"], key
    for key in ("throughput", "latency", "tau", "depth"):
        assert all(n >= 2 for n in second["drawn"][key][:2]), (key, second["drawn"][key])
    assert len(second["canvases"]) == 6 and second["canvases"] != first["canvases"]
    assert second["accuracy"].endswith("%") and second["verdict"] == 3  # SLO, latency, accuracy (paper: no audit)
    assert "Not known" in second["counterfactual"]  # the paper's policy: the other one is unknown
    # Energy: labelled by its source, never 'measured' for an estimate, and unknown when off.
    if energy == "off":
        assert second["energy"] == "–" and second["energyClass"] == "badge none"
    elif "codecarbon" in second["energySource"] and "rapl" not in second["energySource"]:
        assert second["energyClass"] == "badge estimated"
    # No request to any other host.
    origin = urlparse(gateway.url).netloc
    urls = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(urlparse(u).netloc == origin for u in urls if not u.startswith("data:")), urls


def _loaded(browser: DevTools) -> bool:
    return bool(browser.evaluate("typeof window.dashboard === 'object' && !!document.getElementById('v-rps')"))


def test_the_live_accuracy_verdict_is_three_way_on_its_bounds(clock):
    """A loss whose bounds straddle 0.5 pp is inconclusive, with the rows that would decide it."""
    state = LiveState("digits", "cpu", controller_state=controller_state(), slo_ms=50.0,
                      reference_accuracy=(0.99, "planted"), window_s=5.0, clock=clock)
    for i in range(400):  # 98.75 % right: 0.25 pp under the full model's 99 %; bounds on both sides of 0.5 pp
        body, header = answer(["exit"], [4 if i % 80 else 5])
        state.observe(200, 1.0, body, header, labels="4")
    clock.advance(2.0)
    accuracy_line = state.snapshot()["verdict"][2]
    low, high = accuracy_line["interval_pp"]
    assert low < 0.5 < high and accuracy_line["status"] == "inconclusive"
    assert "labelled rows would decide it" in accuracy_line["detail"]
