"""The HTML report opens in a real headless Chromium with no console errors, every image loaded,
and headline numbers equal to the JSON they came from."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from netdiet.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# what the page shows, read in the browser: colours as drawn in each SVG, every text box, every byte figure
_PAGE_JS = """() => {
  const hex = c => { const m = (c || '').match(/\\d+/g); if (!m || m.length < 3 || c === 'none') return null;
                     return '#' + m.slice(0, 3).map(v => (+v).toString(16).padStart(2, '0')).join(''); };
  const charts = [...document.querySelectorAll('figure.chart')].map(f => {
    const drawn = [...f.querySelectorAll('svg [id^="nd-"]')].map(g => {
      const el = g.matches('path, use') ? g : g.querySelector('path, use');
      const st = el ? getComputedStyle(el) : null;
      return {category: g.id.split('-')[2], fill: st && hex(st.fill), stroke: st && hex(st.stroke)};
    });
    const texts = [...f.querySelectorAll('svg text')].map(t => { const r = t.getBoundingClientRect();
      return {text: t.textContent, x: r.left, y: r.top, w: r.width, h: r.height}; });
    const axes = [...f.querySelectorAll('svg g[id^="matplotlib.axis"]')].map(a => ({
      ticks: [...a.querySelectorAll('g[id^="xtick"] text, g[id^="ytick"] text')].map(t => t.textContent),
      label: [...a.querySelectorAll(':scope > g[id^="text"] text')].map(t => t.textContent).join(' ')}));
    return {legend: JSON.parse(f.dataset.legend), drawn, texts, axes};
  });
  const tables = [...document.querySelectorAll('table')].map(t => ({
    head: [...t.querySelectorAll('thead th')].map(h => h.textContent),
    rows: [...t.querySelectorAll('tbody tr')].map(r => [...r.children].map(c => c.textContent))}));
  const cards = [...document.querySelectorAll('.kpi')].map(k => ({
    label: k.querySelector('.kpi-label').textContent, text: k.querySelector('.kpi-value').textContent,
    headline: !!k.querySelector('.headline')}));
  const svgText = [...document.querySelectorAll('svg text')].map(t => t.textContent).join(' ');
  return {palette: JSON.parse(document.getElementById('netdiet-palette').textContent), charts, tables, cards,
          text: document.body.innerText + ' ' + svgText};
}"""


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
            ".headline", "els => els.map(e => ({src: e.dataset.source, path: e.dataset.path, value: e.dataset.value, "
                         "text: e.textContent, kind: e.dataset.kind || null, stableSrc: e.dataset.stableSource || null, "
                         "stablePath: e.dataset.stablePath || null}))")
        shown = page.evaluate(_PAGE_JS)
        if screenshot:
            page.screenshot(path=str(screenshot), full_page=False)
        browser.close()
    return {"errors": errors, "images": images, "headlines": headlines, "requests": requests, **shown}


BYTES = re.compile(r"^-?\d+(\.\d+)? (B|KiB|MiB|GiB|TiB)$")


def _check_one_visual_language(seen: dict) -> None:
    """Every category keeps the palette's one colour in every chart, as drawn; bytes carry units; no label overlaps."""
    palette = seen["palette"]["colours"]
    assert len(set(palette.values())) == len(palette)                  # no two categories share a colour
    drawn_anywhere = set()
    for chart in seen["charts"]:
        assert chart["legend"], chart
        for cat, col in chart["legend"].items():
            assert palette[cat] == col, (cat, col)
        for d in chart["drawn"]:
            assert d["category"] in chart["legend"], d
            assert palette[d["category"]] in (d["fill"], d["stroke"]), d   # the colour really drawn in the SVG
            drawn_anywhere.add(d["category"])
        for axis in chart["axes"]:                                     # a byte axis: every tick label has its unit
            if "bytes" in axis["label"]:
                assert all(BYTES.match(t) for t in axis["ticks"] if t.strip()), axis
        boxes = [t for t in chart["texts"] if t["w"] > 0 and t["text"].strip()]
        for i, a in enumerate(boxes):                                  # no two labels drawn over each other
            for b in boxes[i + 1:]:
                dx = min(a["x"] + a["w"], b["x"] + b["w"]) - max(a["x"], b["x"])
                dy = min(a["y"] + a["h"], b["y"] + b["h"]) - max(a["y"], b["y"])
                assert dx <= 1.5 or dy <= 1.5, (a, b)
    assert drawn_anywhere, "no chart drew a tagged category"
    # no raw exponent anywhere (5.332e+05, 1e6 offsets); byte columns and byte cards carry a unit
    assert not re.search(r"\d(\.\d+)?e[+-]?\d", seen["text"]), re.search(r".{30}\de[+-]?\d.{10}", seen["text"])
    for table in seen["tables"]:
        for col, head in enumerate(table["head"]):
            if "bytes" in head or head in ("fixed", "per sample") and "fit" in table["head"][0]:
                for row in table["rows"]:
                    if col < len(row) and row[col] not in ("", "–") and ("FLOPs" not in row[0]):
                        assert BYTES.match(row[col]), (head, row)


def _check_headlines(seen: dict, docs: dict) -> None:
    """Headlines equal the JSON; a byte field is shown with its unit; a timing headline rests on a stable timing."""
    for h in seen["headlines"]:
        value = _lookup(docs[h["src"]], h["path"])
        assert json.loads(h["value"]) == value, h
        last = h["path"].split(".")[-1]
        if last.endswith("bytes") or last.startswith("peak") or last in ("bytes", "inference_peak", "param_bytes"):
            assert BYTES.match(h["text"]), h
        if "latency" in h["path"] or h["text"].endswith(" ms"):
            assert h["kind"] in ("timing", "timing-ratio"), h
        if h["kind"]:
            assert _lookup(docs[h["stableSrc"]], h["stablePath"]) is True, h   # never from an unstable timing


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
                       ("profile.json", ["profile", "lenet5", "--batch-sizes", "1,8,32", "--measure", "--max-batch-for",
                                         "16MiB"]),
                       ("continual.json", ["continual", "--scenario", "split", "--data", "digits", "--setting", "class",
                                           "--strategy", "replay", "--budget", "256KiB", "--epochs", "1"]),
                       ("plan.json", ["plan", "transformer", "--devices", "4xl4", "--micro-batch", "1,2",
                                      "--no-checkpointing"])]:
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
    _check_headlines(seen, docs)
    _check_one_visual_language(seen)
    assert any(c["label"].endswith("latency") or c["label"].startswith("latency") for c in seen["cards"])
    assert 10_000 < shot.stat().st_size < 300_000


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


def test_a_compress_result_with_hostile_stages_renders_with_a_note(tmp_path):
    # found by the long fuzz: the ensemble-student plane read `stages` outside the field checks every section
    # has, so "stages": -1 was a TypeError instead of a skipped section with its note
    from netdiet.reporting.html import write_report
    doc = json.loads((Path(__file__).parent / "data" / "results" / "compress.json").read_text())
    for bad in (-1, "x", [1, 2]):
        doc["stages"] = bad
        src = tmp_path / "compress.json"
        src.write_text(json.dumps(doc))
        write_report([str(src)], str(tmp_path / "r.html"))
        text = (tmp_path / "r.html").read_text()
        assert "compress.json" in text and ("skipped" in text or "wrong type" in text), bad


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


def _evaluate_doc(**over):
    doc = {"schema": "netdiet.evaluate/1", "source": "m.ndz", "accuracy": 0.9, "bytes_on_disk": 1024, "dense_fp32_bytes": 4096,
           "ratio": 4.0, "latency_ms": {"pytorch": 2.0, "onnxruntime": 1.0},
           "latency_detail": {"pytorch": {"median": 2.0, "ci": [1.0, 3.5], "stable": False, "threads": 1},
                              "onnxruntime": {"median": 1.0, "ci": [0.95, 1.05], "stable": True, "threads": 1}},
           "latency_speedup": {"value": None, "median_ratio": 2.0, "low": 0.95, "high": 3.7, "stable": False, "threads": 1}}
    doc.update(over)
    return doc


def test_an_unstable_timing_is_never_a_headline_nor_part_of_a_ratio(tmp_path):
    src, out = tmp_path / "e.json", tmp_path / "r.html"
    src.write_text(json.dumps(_evaluate_doc()))
    assert main(["report", str(src), "-o", str(out)]) == 0
    text = out.read_text()
    # PyTorch: interval 1.0..3.5 around 2.0, larger half-width 1.5 / 2.0 = 75 %: a marked card, not a headline
    assert 'data-path="latency_ms.pytorch"' not in text and "2 ms, unstable (±75 %) · 1 thread" in text
    # ONNX Runtime: 0.05 / 1.0 = 5 %: a headline naming the flag it rests on
    assert 'data-path="latency_ms.onnxruntime"' in text and 'data-stable-path="latency_detail.onnxruntime.stable"' in text
    assert 'data-path="latency_speedup.value"' not in text and "not shown: a timing was unstable" in text
    stable = _evaluate_doc(latency_detail={k: {**v, "stable": True, "ci": [v["median"] * 0.95, v["median"] * 1.05]}
                                           for k, v in _evaluate_doc()["latency_detail"].items()},
                           latency_speedup={"value": 2.0, "low": 1.8, "high": 2.2, "stable": True, "threads": 1})
    src.write_text(json.dumps(stable))
    assert main(["report", str(src), "-o", str(out)]) == 0
    text = out.read_text()
    assert 'data-path="latency_speedup.value"' in text and "2.0×" in text and "interval 1.80–2.20" in text


def test_results_without_timings_render_with_latency_cards_saying_not_measured(tmp_path):
    ev, prof, old = tmp_path / "e.json", tmp_path / "p.json", tmp_path / "o.json"
    ev.write_text(json.dumps({"schema": "netdiet.evaluate/1", "source": "m.ndz", "accuracy": 0.5,
                              "latency_ms": {"pytorch": None, "onnxruntime": None}}))
    prof.write_text(json.dumps({"schema": "netdiet.profile/1", "model": {"spec": "x"}, "totals": {"params": 10}}))
    # written before timings had intervals: a median with no spread is shown, never as a headline
    old.write_text(json.dumps({"schema": "netdiet.evaluate/1", "source": "old.ndz", "latency_ms": {"pytorch": 35.4}}))
    out = tmp_path / "r.html"
    assert main(["report", str(ev), str(prof), str(old), "-o", str(out)]) == 0
    text = out.read_text()
    assert text.count(">not measured<") == 3          # latency PyTorch (evaluate), forward and training step (profile)
    assert "35.4 ms, unstable (spread unknown)" in text and 'data-path="latency_ms.pytorch"' not in text


def test_the_story_is_written_from_the_numbers():
    from netdiet.reporting.story import compress_story, profile_story, train_story
    mib = 1024 * 1024
    prof = {"model": {"spec": "lenet5"},
            "memory": {"batch_size": 64, "peak_estimated": 10 * mib, "peak_phase": "backward",
                       "peak_breakdown": {"weights": 2 * mib, "gradients": 4 * mib, "activations": 3 * mib,
                                          "workspace": 1 * mib, "outputs": 0}},
            "max_batch": {"budget": 16 * mib, "fits": True, "batch_size": 96, "peak_estimated": 15 * mib}}
    text = " ".join(profile_story(prof))
    # gradients are 4 of the 10 MiB alive at the peak: 40 %
    assert "lenet5's estimated training tensor peak is 10.00 MiB at batch 64, reached in the backward phase" in text
    assert "the largest part alive then is gradients (40 % of it)" in text
    assert "batch 96 is the largest whose estimated peak (15.00 MiB) fits 16.00 MiB" in text
    train = {"model": {"spec": "lenet5"}, "test_acc": 0.973, "peak_memory_bytes": 148 * 1024,
             "history": [{"epoch": 1, "val_acc": 0.95}, {"epoch": 2, "val_acc": 0.97}, {"epoch": 3, "val_acc": 0.96}]}
    text = " ".join(train_story(train))
    assert "97.30 % test accuracy after 3 epochs; validation accuracy peaked at 97.00 % in epoch 2" in text
    assert "RSS increase during an epoch (148.00 KiB at most), not the tensor peak" in text
    comp = {"baseline": {"accuracy": 0.9, "bytes_on_disk": 4096}, "archive": {"bytes": 512, "ratio": 8.0},
            "stages": [{"name": "prune", "accuracy": 0.91, "ratio": 7.9, "bytes_on_disk": 518,
                        "latency_ms": {"pytorch": 3.0}, "latency_detail": {"pytorch": {"ci": [1.0, 5.0], "stable": False}}}],
            "pareto": ["prune"]}
    text = " ".join(compress_story(comp))
    assert "The kept archive holds the model in 512 B, 8.0× smaller than its dense fp32 file (4.00 KiB)" in text
    assert "at 91.00 % accuracy (+1.00 pt vs the dense baseline)" in text and "Latencies of prune did not settle" in text
