"""`corevital view` (docs/view.md): the server's API and safety over a real sweep of a tiny model,
then the pages in a real headless Chromium (Debian's `chromium`, driven by Playwright): the
sweep list and its filters, a trace page, a token's details against the Parquet file's values,
deep links, the static bundle from file://, and prompts that try to run script.

Every expected value is computed here from the Parquet files with pandas, not by the viewer."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from corevital.analysis import evaluation
from corevital.runner.app import run_job
from corevital.view import server as view_server
from corevital.view.bundle import write_bundle

from conftest import compose

XSS = [
    '<img src=x onerror="window.pwned=1"> What is 2+2?',
    "</script><script>window.pwned=2</script> Name a colour.",
    "{{constructor.constructor('window.pwned=3')()}} & <b>bold</b> ${'$'}{x}",
]
PROMPTS = [
    {"prompt": "The capital of France is", "answer": "", "grader": "regex"},
    {"prompt": XSS[0], "answer": "zzqx", "grader": "contains"},
    {"prompt": XSS[1], "answer": "zzqx", "grader": "contains"},
    {"prompt": XSS[2], "answer": "zzqx", "grader": "contains"},
    {"prompt": "Count: one, two, three,", "answer": "", "grader": "regex"},
]
KEY = ["prompt_index", "sample_index", "step_index", "layer_index"]


@pytest.fixture(scope="module")
def sweep(tiny_llama, tmp_path_factory) -> Path:
    """Two seeds of five prompts (three of them hostile markup) on a tiny Llama, with the lens on,
    evaluated (answers: two prompts always right, three always wrong)."""
    root = tmp_path_factory.mktemp("view")
    prompts = root / "q.jsonl"
    lines = [dict(p, answer=p["answer"] or ".*") for p in PROMPTS]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in lines))
    for seed in (1, 2):
        cfg = compose(
            [
                f"model.name_or_path={tiny_llama}",
                f"prompts={prompts}",
                "sampling.max_new_tokens=8",
                "batch_size=5",
                "metrics.logit_lens=all",
                f"seed={seed}",
            ]
        )
        run_job(cfg, root / "sweep" / f"seed={seed}", "tiny")
    assert evaluation.main([str(root / "sweep"), "--resamples", "50"]) == 0  # writes sweep/evaluation/
    return root / "sweep"


def _traces(sweep: Path) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in sorted(sweep.rglob("traces.parquet"))]
    labels = pd.read_parquet(sweep / "evaluation" / "labels.parquet")[["trace_id", "correct"]]
    return pd.concat(frames).merge(labels, on="trace_id", how="left")


@pytest.fixture(scope="module")
def served(sweep):
    srv = view_server.start([sweep])
    view_server.serve_in_thread(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


def _get(srv, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """One request with `path` sent exactly as given (no client-side normalisation of `..`)."""
    host, port = srv.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.putrequest("GET", path, skip_accept_encoding=True)
    for k, v in (headers or {}).items():
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


# --- the API, against pandas ---------------------------------------------------------------
def test_the_list_filters_and_sorts_as_pandas_does(served, sweep):
    t = _traces(sweep)
    status, _, body = _get(served, "/api/traces?limit=1000")
    listed = json.loads(body)
    assert status == 200 and listed["total"] == len(t) == 10
    for params, expected in [
        ({"q": "WINDOW.PWNED"}, t[t.prompt_text.str.lower().str.contains("window.pwned", regex=False)]),
        ({"seed": "2"}, t[t.seed == 2]),
        ({"correct": "wrong"}, t[t.correct == False]),  # noqa: E712
        ({"correct": "correct", "seed": "1"}, t[(t.correct == True) & (t.seed == 1)]),  # noqa: E712
    ]:
        got = json.loads(_get(served, "/api/traces?" + urllib.parse.urlencode(params))[2])
        assert got["total"] == len(expected) > 0, params
        assert {r["trace_id"] for r in got["rows"]} == set(expected.trace_id)
    got = json.loads(_get(served, "/api/traces?sort=mean_token_logprob&desc=1&limit=3")[2])
    assert [r["trace_id"] for r in got["rows"]] == list(
        t.sort_values("mean_token_logprob", ascending=False).trace_id[:3]
    )
    window = json.loads(_get(served, "/api/traces?sort=rauq_head_mean&offset=4&limit=3")[2])
    assert [r["trace_id"] for r in window["rows"]] == list(t.sort_values("rauq_head_mean").trace_id[4:7])


def test_a_traces_api_values_are_the_parquet_files(served, sweep):
    t = _traces(sweep).iloc[3]
    d = json.loads(_get(served, f"/api/trace/{t.trace_id}")[2])
    job = next(p.parent for p in sweep.rglob("traces.parquet") if t.trace_id in set(pd.read_parquet(p).trace_id))
    rows = pd.read_parquet(job / "summaries.parquet")
    rows = rows[rows.trace_id == t.trace_id].sort_values(KEY)
    L = rows.layer_index.nunique()
    assert d["trace"]["prompt_text"] == t.prompt_text and d["layers"]["count"] == L
    first = rows[rows.layer_index == 0]
    assert d["rows"]["token_text"] == list(first.token_text)
    for column in ("token_logprob", "logits_entropy"):
        np.testing.assert_array_equal(np.array(d["rows"][column], dtype=np.float32)[1:], first[column].to_numpy()[1:])
    for column in ("attn_entropy_mean", "hidden_l2_norm", "lens_kl"):
        got = np.array([np.nan if v is None else v for v in d["layers"]["metrics"][column]], dtype=np.float32)
        np.testing.assert_array_equal(got, rows[column].to_numpy(np.float32))
    doc = json.loads((job / "traces" / f"prompt_{t.prompt_index:05d}.json").read_text())
    assert d["topk"][5] == doc["timeline"][5]["logits_summary"]["topk"]


def test_paths_outside_the_app_and_its_data_are_404(served, sweep):
    secret = sweep.parent / "secret.txt"
    secret.write_text("not for the browser")
    for path in [
        "/static/../data.py",
        "/static/..%2fdata.py",
        "/static/%2e%2e/%2e%2e/secret.txt",
        "/../secret.txt",
        "/..%2f..%2fsecret.txt",
        f"/{secret}",
        f"/static/{secret}",
        "//etc/passwd",
        "/api/trace/..%2f..%2fsecret.txt",
        "/api/trace/" + urllib.parse.quote(str(secret), safe=""),
        "/static/app.js/../../../etc/passwd",
        "/api/../static/app.js",
    ]:
        status, headers, body = _get(served, path)
        assert status == 404, path
        assert b"not for the browser" not in body and b"root:" not in body
    status, headers, body = _get(served, "/static/app.js")
    assert status == 200 and body == view_server.static_bytes("app.js")


def test_every_response_forbids_inline_script_and_other_origins(served):
    for path in ("/", "/static/app.js", "/api/meta", "/nope"):
        csp = _get(served, path)[1]["Content-Security-Policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
        assert "unsafe" not in csp and "http" not in csp and "*" not in csp


def test_a_non_loopback_host_needs_the_printed_token(sweep):
    srv = view_server.start([sweep], host="0.0.0.0")
    view_server.serve_in_thread(srv)
    try:
        assert srv.token and srv.url.endswith(f"?token={srv.token}")
        assert _get(srv, "/api/meta")[0] == 403 and _get(srv, "/")[0] == 403
        assert _get(srv, "/api/meta?token=wrong")[0] == 403
        status, headers, _ = _get(srv, f"/?token={srv.token}")
        assert status == 200
        cookie = headers["Set-Cookie"].split(";")[0]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=Strict" in headers["Set-Cookie"]
        assert _get(srv, "/api/meta", {"Cookie": cookie})[0] == 200
        assert _get(srv, "/api/meta", {"Cookie": cookie + "x"})[0] == 403
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_command_prints_one_line_with_its_url_and_serves(sweep):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corevital.cli", "view", str(sweep), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline().strip()
        m = re.fullmatch(r"corevital: viewing (\d+) trace\(s\) at (http://127\.0\.0\.1:(\d+)/)", line)
        assert m and int(m[1]) == 10, line
        conn = http.client.HTTPConnection("127.0.0.1", int(m[3]), timeout=30)
        conn.request("GET", "/api/meta")
        assert json.loads(conn.getresponse().read())["count"] == 10
    finally:
        proc.terminate()
        proc.wait(30)
    bad = subprocess.run(
        [sys.executable, "-m", "corevital.cli", "view", str(sweep / "nope")], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a directory" in bad.stderr


def test_top_k_and_flags_are_read_from_the_trace_bytes_as_a_full_parse_reads_them():
    """data._topk_and_health finds each step's top-k list and the health flags in a trace's bytes
    without parsing its timeline; token texts that spell the document's own keys (escaped in the
    JSON) do not fool it, and a document laid out otherwise is parsed whole."""
    from corevital.output import tracedoc
    from corevital.output.vocab import Vocabulary
    from corevital.view.data import _topk_and_health

    from synthetic import FakeTokenizer, clean_capture, header

    class Tricky(FakeTokenizer):
        def batch_decode(self, ids):
            return [['"topk":[', ']},"layers"', '"logits_summary":null', '\\"', "ü\n"][i[0] % 5] for i in ids]

    cap = clean_capture(P=7, G=9, L=3)
    cap.topk_ids[:] = np.arange(5)  # every top-k token text is a tricky one
    h = header()
    raw = tracedoc.render(cap, h, Vocabulary(Tricky(), 300), 'out ]},"layers"').json
    doc = json.loads(raw)
    want = [None if s["logits_summary"] is None else s["logits_summary"]["topk"] for s in doc["timeline"]]
    assert _topk_and_health(raw, h.trace_id) == {"timeline_topk": want, "health": doc["health"]}
    assert _topk_and_health(raw, "another") is None
    spaced = json.dumps(doc, indent=1).encode()  # another layout: parsed whole
    assert _topk_and_health(spaced, h.trace_id) == {"timeline_topk": want, "health": doc["health"]}


# --- in the browser ----------------------------------------------------------------------
def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium: Debian's package (installed here through apt-get when missing and we
    are root), driven by Playwright's Python package."""
    playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (./scripts/test does)")
    path = shutil.which("chromium") or _install_chromium()
    if path is None:
        message = "no chromium: install Debian's package (apt-get install chromium) to run the browser tests"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield b
        b.close()


def _install_chromium() -> str | None:
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        if subprocess.run(cmd, capture_output=True, env=env, timeout=900).returncode != 0:
            return None
    return shutil.which("chromium")


@pytest.fixture
def page(browser):
    """A fresh page that fails the test on any dialog (alert) and records every request's URL."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.dialogs, pg.requests, pg.errors = [], [], []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    yield pg
    context.close()


def _number(text: str) -> float | None:
    return None if text == "" else float(text)


def _check_token_details(pg, rows: pd.DataFrame, step: int) -> None:
    """The token-details panel shows the Parquet file's values of row `step`, every layer."""
    details = pg.get_by_test_id("token-details")
    details.wait_for()
    mine = rows[rows.step_index == step].sort_values("layer_index")
    per_row = details.locator(":scope > .kv [data-metric]")
    assert per_row.count() >= 4
    for i in range(per_row.count()):
        cell = per_row.nth(i)
        column = cell.get_attribute("data-metric")
        want = mine[column].iloc[0]
        got = _number(cell.inner_text())
        assert (got is None) == pd.isna(want), column
        if got is not None:
            assert got == pytest.approx(float(want), rel=1e-5, abs=1e-30), column
    layer_rows = details.get_by_test_id("layer-row")
    assert layer_rows.count() == len(mine)
    for l in range(layer_rows.count()):
        row = layer_rows.nth(l)
        assert int(row.get_attribute("data-layer")) == l
        for column in (
            "attn_entropy_mean",
            "hidden_l2_norm",
            "attn_sink_mass",
            "lens_entropy",
            "lens_kl",
            "lens_top1_match",
        ):
            want = mine[column].iloc[l]
            got = _number(row.locator(f'[data-metric="{column}"]').inner_text())
            assert (got is None) == pd.isna(want), (column, l)
            if got is not None:
                assert got == pytest.approx(float(want), rel=1e-5, abs=1e-30), (column, l)


def _rows_of(sweep: Path, trace_id: str) -> pd.DataFrame:
    for p in sweep.rglob("summaries.parquet"):
        rows = pd.read_parquet(p, filters=[("trace_id", "==", trace_id)])
        if len(rows):
            return rows
    raise AssertionError(trace_id)


def test_sweep_page_lists_filters_and_opens_a_trace(page, served, sweep):
    t = _traces(sweep)
    page.goto(served.url)
    count = page.get_by_test_id("trace-count")
    page.get_by_test_id("trace-row").first.wait_for()
    assert count.inner_text() == "10" and page.get_by_test_id("trace-row").count() == 10
    page.get_by_test_id("search").fill("Name a COLOUR")
    expect(page.get_by_test_id("trace-count")).to_have_text("2")
    ids = {page.get_by_test_id("trace-row").nth(i).get_attribute("data-trace-id") for i in range(2)}
    assert ids == set(t[t.prompt_text.str.contains("Name a colour")].trace_id)
    page.get_by_test_id("search").fill("")
    page.get_by_test_id("filter-correct").select_option("correct")
    expected = str(int((t.correct == True).sum()))  # noqa: E712
    expect(page.get_by_test_id("trace-count")).to_have_text(expected)
    page.get_by_test_id("filter-correct").select_option("")
    page.locator('[data-sort="mean_token_logprob"]').click()
    lowest = t.sort_values("mean_token_logprob").trace_id.iloc[0]
    expect(page.get_by_test_id("trace-row").first).to_have_attribute("data-trace-id", lowest)
    page.get_by_test_id("trace-row").first.click()
    page.get_by_test_id("prompt-text").wait_for()
    assert lowest in page.url
    row = t[t.trace_id == lowest].iloc[0]
    assert page.get_by_test_id("prompt-text").inner_text() == row.prompt_text
    assert page.get_by_test_id("output-text").inner_text() == row.output_text
    rows = _rows_of(sweep, lowest)
    first = rows[rows.layer_index == 0].sort_values("step_index")
    tokens = page.get_by_test_id("token")
    assert tokens.count() == len(first)
    assert [int(tokens.nth(i).get_attribute("data-step")) for i in range(tokens.count())] == list(first.step_index)
    assert tokens.all_text_contents() == list(first.token_text)
    step = int(first.step_index.iloc[-2])
    tokens.nth(step).click()
    _check_token_details(page, rows, step)
    assert not page.dialogs and not page.errors


def test_a_deep_link_opens_the_trace_and_the_token(page, served, sweep):
    t = _traces(sweep)
    trace_id = t.trace_id.iloc[6]
    rows = _rows_of(sweep, trace_id)
    page.goto(served.url + f"#/trace/{trace_id}?step=4")
    _check_token_details(page, rows, 4)
    assert page.get_by_test_id("token-details").get_attribute("data-step") == "4"
    page.get_by_test_id("token").nth(7).click()
    expect(page).to_have_url(re.compile(r"step=7(&|$)"))
    link = page.url
    fresh = page.context.new_page()
    fresh.goto(link)
    _check_token_details(fresh, rows, 7)
    assert trace_id in link


def test_two_traces_of_one_prompt_side_by_side(page, served, sweep):
    """The trace page offers the other traces of its prompt (the other seed here); choosing one
    shows both, each with its own tokens, and the URL names both."""
    t = _traces(sweep)
    one = t[(t.prompt_index == 4) & (t.seed == 1)].trace_id.iloc[0]
    other = t[(t.prompt_index == 4) & (t.seed == 2)].trace_id.iloc[0]
    page.goto(served.url + f"#/trace/{one}")
    chooser = page.get_by_test_id("compare-with")
    expect(chooser.locator("option")).to_have_count(2)  # the placeholder and the other seed's trace
    chooser.select_option(other)
    expect(page.locator(".compare .panel")).to_have_count(2)
    assert f"/compare/{one}/{other}" in page.url
    for i, trace_id in enumerate((one, other)):
        rows = _rows_of(sweep, trace_id)
        texts = rows[rows.layer_index == 0].sort_values("step_index").token_text.tolist()
        panel = page.locator(".compare .panel").nth(i)
        assert panel.get_by_test_id("token").all_text_contents() == texts
        assert panel.get_by_test_id("output-text").text_content() == t[t.trace_id == trace_id].output_text.iloc[0]


def test_flags_are_marked_on_their_tokens_and_tokens_colour_by_a_layers_metric(page, tmp_path):
    """A job (written by the job's writer from a synthetic capture) whose answer repeats a 4-gram:
    the repetition_loop flag's steps are outlined on the trace page and the flag is filterable;
    colouring by a per-(row, layer) metric at a chosen layer gives each token the colour order of
    that layer's values in the Parquet file."""
    from corevital.output.sinks import Delivery
    from corevital.output.vocab import Vocabulary
    from corevital.output.writer import Batch, JobWriter, Store

    from synthetic import FakeTokenizer, clean_capture, header

    caps = [clean_capture(P=8, G=16, L=4, seed=i) for i in range(2)]
    caps[1].token_ids[8:] = np.tile([11, 12, 13, 14], 4)  # the answer says one 4-gram four times
    store = Store(tmp_path / "job")
    store.prepare("x", resume=False)
    with JobWriter(store, "json", Delivery([]), Vocabulary(FakeTokenizer(), 300), {}, 2, "inline") as w:
        w.put(Batch(0, caps, [header(prompt_index=i, trace_id=f"t{i}") for i in range(2)]))
        w.finish()
    store.remove()
    doc = json.loads((tmp_path / "job" / "traces" / "prompt_00001.json").read_text())
    fired = doc["health"]["repetition_loop"]
    assert fired["fired"] and fired["steps"]
    srv = view_server.start([tmp_path / "job"])
    view_server.serve_in_thread(srv)
    try:
        page.goto(srv.url + "#/?flag=repetition_loop")
        expect(page.get_by_test_id("trace-count")).to_have_text("1")
        page.get_by_test_id("trace-row").first.click()
        expect(page.get_by_test_id("token")).to_have_count(24)
        flagged = page.locator("[data-testid=token].flagged")
        assert [int(x) for x in flagged.evaluate_all("es => es.map(e => e.dataset.step)")] == fired["steps"]
        assert "repetition_loop" in flagged.first.get_attribute("title")
        page.get_by_test_id("colour-by").select_option("hidden_l2_norm")
        page.get_by_test_id("colour-layer").select_option("2")
        colours = page.get_by_test_id("token").evaluate_all("es => es.map(e => getComputedStyle(e).backgroundColor)")
    finally:
        srv.shutdown()
        srv.server_close()
    rows = pd.read_parquet(tmp_path / "job" / "summaries.parquet", filters=[("trace_id", "==", "t1")])
    values = rows[rows.layer_index == 2].sort_values("step_index").hidden_l2_norm.to_numpy()
    assert colours[0] in ("rgba(0, 0, 0, 0)", "transparent") and len(set(colours[1:])) > 10
    lowest, highest = int(np.nanargmin(values)), int(np.nanargmax(values))
    assert colours[lowest] != colours[highest] and "layer 2" in page.locator(".legend").inner_text()


def test_hostile_prompts_are_shown_as_text_and_run_nothing(page, served, sweep):
    t = _traces(sweep)
    page.goto(served.url)
    page.get_by_test_id("trace-row").first.wait_for()
    for prompt in XSS:
        trace_id = t[t.prompt_text == prompt].trace_id.iloc[0]
        page.goto(served.url + f"#/trace/{trace_id}")
        expect(page.get_by_test_id("prompt-text")).to_have_text(prompt)
        assert page.get_by_test_id("prompt-text").text_content() == prompt
        assert page.locator("main img, main b, main script").count() == 0
    page.goto(served.url + "#/?q=" + urllib.parse.quote("<img"))
    expect(page.get_by_test_id("trace-count")).to_have_text("2")
    assert page.evaluate("window.pwned") is None
    assert not page.dialogs and not page.errors


def test_the_bundle_opens_from_file_with_no_network_even_when_copied(page, sweep, tmp_path):
    out = tmp_path / "bundle"
    assert write_bundle([sweep], out, max_traces=4) == 4
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    page.route(re.compile(r"^(?!file:).*"), lambda route: route.abort())  # no network at all
    page.goto(moved.joinpath("index.html").as_uri())
    page.get_by_test_id("trace-row").first.wait_for()
    assert page.get_by_test_id("trace-count").inner_text() == "4"
    first = page.get_by_test_id("trace-row").first.get_attribute("data-trace-id")
    page.get_by_test_id("trace-row").first.click()
    page.get_by_test_id("token").nth(5).click()
    _check_token_details(page, _rows_of(sweep, first), 5)
    assert all(u.startswith("file://") for u in page.requests)
    assert all(Path(urllib.parse.urlsplit(u).path).is_relative_to(moved) for u in page.requests)
    assert not page.dialogs and not page.errors


def test_the_evaluation_page_shows_the_signal_table(page, served, sweep):
    signals = pd.read_parquet(sweep / "evaluation" / "signals.parquet")
    page.goto(served.url + "#/evaluation")
    table = page.get_by_test_id("signal-table")
    table.wait_for()
    assert table.locator("tr").count() == len(signals) + 1
    assert page.get_by_test_id("roc").is_visible()
    detectors = pd.read_parquet(sweep / "evaluation" / "detectors.parquet")  # the fitted detectors, out of fold
    rows = page.get_by_test_id("detector-table").locator("tr")
    assert rows.count() == len(detectors) + 1
    first = rows.nth(1).locator("td")
    assert first.nth(0).inner_text() == detectors.detector.iloc[0]
    assert float(first.nth(4).inner_text()) == pytest.approx(detectors.auroc.iloc[0], abs=5e-4)
    for plot in ("layer-plot", "horizon-plot"):  # drawn: more than the white background and the chance line
        colours = page.get_by_test_id(plot).evaluate(
            "c => new Set(Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)).size"
        )
        assert colours > 20, plot
    layers = pd.read_parquet(sweep / "evaluation" / "layers.parquet")
    assert page.get_by_test_id("layer-plot").locator("xpath=..").locator("li").count() == layers.model.nunique()


@pytest.mark.e2e
def test_the_embedded_models_dollar_tokens_show_in_the_report_bundle_and_the_server(page, tmp_path):
    """SmolLM2's tokens 9212 ("$$") and 17410 (" $$") once crashed `corevital report` (matplotlib
    read them as math). The report is the viewer's bundle now: both tokens appear as text, in the
    bundle from file:// and in the served page. The served trace page of the first prompt is the
    README's screenshot (COREVITAL_SCREENSHOTS=1 writes it to docs/img/view_trace.png)."""
    from conftest import run_cli

    (tmp_path / "prompts.txt").write_text("The capital of France is\nRender $$x^2$$ and $$ in TeX\n")
    overrides = ["prompts=prompts.txt", "sampling=greedy", "sampling.max_new_tokens=12", "hydra.run.dir=out"]
    proc = run_cli(overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = pd.read_parquet(tmp_path / "out" / "summaries.parquet", filters=[("layer_index", "==", 0)])
    dollars = rows[(rows.prompt_index == 1) & rows.token_id.isin([9212, 17410])].sort_values("step_index")
    assert set(dollars.token_id) == {9212, 17410} and set(dollars.token_text) == {"$$", " $$"}
    report = subprocess.run(
        [sys.executable, "-m", "corevital.cli", "report", str(tmp_path / "out")], capture_output=True, text=True
    )
    assert report.returncode == 0, report.stderr
    assert "wrote 2 trace(s)" in report.stdout
    trace_id = rows[rows.prompt_index == 1].trace_id.iloc[0]
    page.goto((tmp_path / "out" / "report" / "index.html").as_uri() + f"#/trace/{trace_id}")
    tokens = page.get_by_test_id("token")
    expect(tokens).to_have_count(int(rows[rows.prompt_index == 1].step_index.max()) + 1)
    for step, text in zip(dollars.step_index, dollars.token_text):
        assert page.locator(f'[data-testid=token][data-step="{step}"]').text_content() == text
    srv = view_server.start([tmp_path / "out"])
    view_server.serve_in_thread(srv)
    try:
        first = rows[rows.prompt_index == 0].trace_id.iloc[0]
        step = int(rows[rows.prompt_index == 0].step_index.max()) - 3
        page.goto(srv.url + f"#/trace/{first}?step={step}&colour=token_logprob&heat=attn_entropy_mean")
        page.get_by_test_id("token-details").wait_for()
        png = page.screenshot(full_page=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        if os.environ.get("COREVITAL_SCREENSHOTS") == "1":
            (Path(__file__).resolve().parents[1] / "docs" / "img" / "view_trace.png").write_bytes(png)
    finally:
        srv.shutdown()
        srv.server_close()
    assert not page.dialogs and not page.errors
