"""The HTML report opens in a real headless Chromium with no console errors, every image loaded,
and headline numbers equal to the JSON they came from."""
import json
import os
import shutil
from pathlib import Path

import pytest

from netdiet.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _open_in_chromium(html_path: Path, screenshot: Path | None = None) -> dict:
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url) if not r.url.startswith(("data:", "file:")) else None)
        page.goto(html_path.resolve().as_uri())
        page.wait_for_load_state("load")
        images = page.eval_on_selector_all("img", "els => els.map(e => ({w: e.naturalWidth, c: e.complete}))")
        headlines = page.eval_on_selector_all(
            ".headline", "els => els.map(e => ({src: e.dataset.source, path: e.dataset.path, value: e.dataset.value, text: e.textContent}))")
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    return {"errors": errors, "images": images, "headlines": headlines, "requests": requests}


def _lookup(doc, path):
    cur = doc
    for part in path.split("."):
        cur = cur[int(part)] if isinstance(cur, list) else cur[part]
    return cur


def _results(tmp_path: Path) -> list[Path]:
    """Real results written by netdiet commands, so the page shows true numbers.

    NETDIET_REPORT_FROM=<folder> renders that folder's results instead (e.g. `netdiet-demo/`): that is how the
    README's screenshot is made, by this test and under its checks:
    NETDIET_REPORT_FROM=netdiet-demo NETDIET_SCREENSHOT=docs/report.png pytest tests/test_report_html.py
    """
    if os.environ.get("NETDIET_REPORT_FROM"):
        folder = Path(os.environ["NETDIET_REPORT_FROM"])
        first = [folder / "demo.json"] if (folder / "demo.json").exists() else []
        return first + sorted(p for p in folder.glob("*.json") if p.name != "demo.json")
    made = []
    for name, argv in [("models.json", ["models"]),
                       ("profile.json", ["profile", "lenet5", "--batch-sizes", "1,8,32"]),
                       ("continual.json", ["continual", "--scenario", "split", "--data", "digits", "--setting", "class",
                                           "--strategy", "replay", "--budget", "256KiB", "--epochs", "1"])]:
        out = tmp_path / name
        if main(argv + ["--json", str(out)]) == 0 and out.exists():
            made.append(out)
    return made


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium_with_true_numbers(tmp_path):
    results = _results(tmp_path)
    assert results, "no netdiet command produced a result"
    html = tmp_path / "report.html"
    assert main(["report", *map(str, results), "-o", str(html)]) == 0
    shot = Path(os.environ["NETDIET_SCREENSHOT"]) if os.environ.get("NETDIET_SCREENSHOT") else tmp_path / "report.png"
    seen = _open_in_chromium(html, shot)
    assert seen["errors"] == []
    assert seen["requests"] == []          # self-contained: nothing fetched from a network
    assert seen["images"] and all(i["c"] and i["w"] > 0 for i in seen["images"])
    assert seen["headlines"]
    docs = {p.name: json.loads(p.read_text()) for p in results}
    for h in seen["headlines"]:
        assert json.loads(h["value"]) == _lookup(docs[h["src"]], h["path"]), h
    assert shot.stat().st_size > 10_000


def test_report_rejects_non_netdiet_json_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["report", str(bad), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a netdiet result" in err[0]
    newer = tmp_path / "y.json"
    newer.write_text('{"schema": "netdiet.profile/99"}')
    assert main(["report", str(newer), "-o", str(tmp_path / "r.html")]) == 2
    assert not (tmp_path / "r.html").exists()


def test_report_renders_a_result_with_missing_optional_parts(tmp_path):
    partial = tmp_path / "p.json"
    partial.write_text(json.dumps({"schema": "netdiet.profile/1", "model": {"spec": "x"}, "totals": {"params": 10}}))
    out = tmp_path / "r.html"
    assert main(["report", str(partial), "-o", str(out)]) == 0
    text = out.read_text()
    assert 'data-path="totals.params"' in text and "Operators" not in text


def test_report_renders_listings_and_its_own_receipt(tmp_path):
    """`netdiet report *.json` in a folder that also holds listings or a report receipt must not fail."""
    recipes, receipt = tmp_path / "recipes.json", tmp_path / "receipt.json"
    assert main(["recipes", "--json", str(recipes)]) == 0
    assert main(["report", str(recipes), "-o", str(tmp_path / "a.html"), "--json", str(receipt)]) == 0
    out = tmp_path / "b.html"
    assert main(["report", str(recipes), str(receipt), "-o", str(out)]) == 0
    text = out.read_text()
    assert "deep-compression" in text and "<h2>Report" in text


def test_section_titles_name_the_scenario_and_archive_not_their_json(tmp_path):
    cont = tmp_path / "c.json"
    cont.write_text(json.dumps({"schema": "netdiet.continual/1", "scenario": {"name": "split", "tasks": []},
                                "setting": "class", "budget": 262144, "strategies": []}))
    ev = tmp_path / "e.json"
    ev.write_text(json.dumps({"schema": "netdiet.evaluate/1", "source": "model.ndz", "accuracy": 0.5}))
    out = tmp_path / "r.html"
    assert main(["report", str(cont), str(ev), "-o", str(out)]) == 0
    text = out.read_text()
    assert "<h2>Continual learning · split · class-incremental · budget 256.00 KiB</h2>" in text
    assert "<h2>Evaluation · model.ndz</h2>" in text


def test_a_3000x3000_accuracy_matrix_is_summarised_and_renders_in_seconds(tmp_path):
    """A heatmap annotates every cell: 9 million cells took over 180 s. At most 50x50 are drawn, with a note."""
    import time
    doc = {"schema": "netdiet.continual/1", "setting": "class",
           "strategies": [{"name": "big", "accuracy_matrix": [[0.5] * 3000 for _ in range(3000)]}]}
    src = tmp_path / "big.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "big.html"
    start = time.perf_counter()
    assert main(["report", str(src), "-o", str(out)]) == 0
    assert time.perf_counter() - start < 60
    page = out.read_text()
    assert "3000×3000; shown as 50×50 evenly spaced cells" in page
    assert page.count("<img") == 1
