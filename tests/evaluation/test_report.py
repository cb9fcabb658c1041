"""The HTML evaluation report: self-contained, well-formed, and showing exactly the pairs it should."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from isc.evaluation.metrics import Metrics, evaluate, precision_recall_curve
from isc.evaluation.report import report_figures, write_report
from isc.evaluation.results import Evidence, StageResult
from isc.formats.pairs import GroundTruth, Predictions

# --- a tiny HTML tree (stdlib parser) ------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: list[str] = field(default_factory=list)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def find_all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants with this tag (any if None) whose attributes hold these values ('' = present)."""
        found = []
        for child in self.children:
            if (tag is None or child.tag == tag) and all(
                (k.replace("_", "-") in child.attrs) if v == "" else child.attrs.get(k.replace("_", "-")) == v
                for k, v in attrs.items()
            ):
                found.append(child)
            found += child.find_all(tag, **attrs)
        return found

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class TreeBuilder(HTMLParser):
    """Builds a :class:`Node` tree and records every end tag that does not close the open element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.errors: list[str] = []
        self.doctype = ""

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if self.stack[-1].tag != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1].tag}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.errors == [], builder.errors[:5]
    assert [n.tag for n in builder.stack] == ["#document"], "unclosed elements"
    assert builder.doctype.lower() == "doctype html"
    return builder.root


# --- a small benchmark -----------------------------------------------------------------------------------

GT_ROWS = [("Q0", "R0"), ("Q1", "R1"), ("Q2", "R2"), ("Q3", "R3"), ("Q6", "R5"), ("Q4", ""), ("Q5", "")]
# ranked: T T F T F F T F over P = 5 pairs: precision 1, 1, .67, ... -> P90 at recall 2/5, score 0.90
PRED_ROWS = [
    ("Q0", "R0", 0.95),
    ("Q1", "R1", 0.90),
    ("Q4", "R2", 0.88),
    ("Q2", "R2", 0.85),
    ("Q5", "R4", 0.80),
    ("Q0", "R3", 0.70),
    ("Q3", "R3", 0.30),
    ("Q1", "R5", 0.20),
]
EVIDENCE = {
    ("Q4", "R2"): Evidence(
        query_box=(4, 4, 20, 20), reference_box=(10, 8, 50, 40), label="crop 5 @ 256 px, model 2"
    ),
    ("Q1", "R5"): Evidence(reference_box=(-10, -10, 300, 30), label="clipped"),  # R5 is 96x64: clipped
    ("Q5", "R4"): Evidence(query_box=(0, 0, 10, 10), label="on a missing image"),
}


def _stage(name: str, figures: dict[str, float | None], seconds: float | None) -> StageResult:
    """A stage whose official metrics are ``figures`` (missing ones undefined)."""
    values = {k: figures.get(k) for k in ("uAP", "recall_at_p90", "recall_at_rank1", "recall_at_rank10")}
    return StageResult(name, Predictions([], [], []), Metrics(threshold_at_p90=None, **values), seconds)


STAGES = [
    _stage(
        "global", {"uAP": 0.5, "recall_at_p90": 0.2, "recall_at_rank1": 0.6, "recall_at_rank10": 0.8}, 0.0123
    ),
    _stage("+ multi-scale", {"uAP": 0.55, "recall_at_p90": None, "recall_at_rank1": 0.65}, None),
    _stage(
        "+ local verification",
        {"uAP": 0.61234, "recall_at_p90": 0.4, "recall_at_rank1": 0.7, "recall_at_rank10": 0.85},
        1.5,
    ),
]


def gt(rows: list[tuple[str, str]]) -> GroundTruth:
    return GroundTruth([q for q, _ in rows], [r for _, r in rows])


def preds(rows: list[tuple[str, str, float]]) -> Predictions:
    return Predictions([q for q, _, _ in rows], [r for _, r, _ in rows], [s for _, _, s in rows])


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse(
        (w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=tuple(int(v) for v in rng.integers(0, 256, 3))
    )
    return image


@pytest.fixture
def bench(tmp_path: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images for GT_ROWS: R1 is large (downscaled), R4 is missing, Q5 is not an image."""
    (tmp_path / "q").mkdir()
    (tmp_path / "r").mkdir()
    refs = {f"R{i}": tmp_path / "r" / f"R{i}.jpg" for i in range(6)}
    queries = {f"Q{i}": tmp_path / "q" / f"Q{i}.png" for i in range(7)}
    for i, (rid, path) in enumerate(refs.items()):
        if rid != "R4":
            picture(i, (400, 300) if rid == "R1" else (96, 64)).save(path)
    for i, (qid, path) in enumerate(queries.items()):
        if qid == "Q5":
            path.write_bytes(b"definitely not an image")
        else:
            picture(100 + i, (96, 64)).save(path)
    return queries, refs


def render(tmp_path: Path, bench, rows=PRED_ROWS, gt_rows=GT_ROWS, **kwargs) -> tuple[str, Node]:
    queries, refs = bench
    arguments = {
        "predictions": preds(rows),
        "ground_truth": gt(gt_rows),
        "stages": STAGES,
        "query_paths": queries,
        "reference_paths": refs,
        "evidence": EVIDENCE,
        "subtitle": "tiny test benchmark",
    }
    arguments.update(kwargs)
    out = write_report(tmp_path / "run" / "report.html", **arguments)
    assert out == tmp_path / "run" / "report.html"
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # atomic write left no temp file
    page = out.read_text(encoding="utf-8")
    return page, parse(page)


def expected_galleries(
    rows: list[tuple[str, str, float]], gt_rows: list[tuple[str, str]], threshold: float | None, size: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Top false positives and missed copies by plain Python, independent of the module."""
    truth = [(q, r) for q, r in gt_rows if r]
    scores = {(q, r): s for q, r, s in rows}
    false = sorted((-s, q, r) for q, r, s in rows if (q, r) not in set(truth))
    unretrieved = sorted(p for p in truth if p not in scores)
    low = sorted(
        (scores[p], p) for p in truth if p in scores and (threshold is None or scores[p] < threshold)
    )
    return [(q, r) for _, q, r in false][:size], (unretrieved + [p for _, p in low])[:size]


def gallery_pairs(root: Node, name: str) -> list[tuple[str, str]]:
    (gallery,) = root.find_all(data_gallery=name)
    return [(c.attrs["data-query-id"], c.attrs["data-reference-id"]) for c in gallery.find_all("article")]


def card(root: Node, kind: str, query_id: str, reference_id: str) -> Node:
    (found,) = root.find_all(
        "article", data_kind=kind, data_query_id=query_id, data_reference_id=reference_id
    )
    return found


def fact(node: Node, name: str) -> str:
    (dd,) = [d for d in node.find_all("dd") if name in d.classes()]
    return dd.all_text()


# --- the page ----------------------------------------------------------------------------------------------


def test_page_is_self_contained_and_well_formed(tmp_path: Path, bench) -> None:
    page, root = render(tmp_path, bench)
    assert page.startswith("<!DOCTYPE html>")
    assert "http://" not in page and "https://" not in page
    assert [m.attrs for m in root.find_all("meta", charset="")] == [{"charset": "utf-8"}]
    assert root.find_all("script") == [] and root.find_all("link") == []
    for node in root.find_all():
        for attr in ("src", "href"):
            value = node.attrs.get(attr)
            assert value is None or value.startswith(("data:", "#")), (node.tag, attr, value[:40])
    ids = [n.attrs["id"] for n in root.find_all(id="")]
    assert len(ids) == len(set(ids))
    for href in (n.attrs["href"] for n in root.find_all("a")):
        assert href[1:] in ids
    images = root.find_all("img")
    assert images
    for img in images:
        assert img.attrs["src"].startswith("data:image/jpeg;base64,")
        assert img.attrs["data-image-id"] in img.attrs["alt"]
        decoded = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1])))
        assert decoded.format == "JPEG" and max(decoded.size) <= 192
    (title,) = root.find_all("h1")
    assert title.all_text() == "Copy detection report"
    assert "tiny test benchmark" in page


def test_galleries_show_the_expected_pairs(tmp_path: Path, bench) -> None:
    threshold = evaluate(gt(GT_ROWS), preds(PRED_ROWS)).threshold_at_p90
    assert threshold == pytest.approx(0.90)
    for size in (12, 2):
        _, root = render(tmp_path, bench, gallery_size=size)
        false_positives, missed = expected_galleries(PRED_ROWS, GT_ROWS, threshold, size)
        assert gallery_pairs(root, "false-positives") == false_positives
        assert gallery_pairs(root, "missed") == missed
    _, root = render(tmp_path, bench)
    assert gallery_pairs(root, "false-positives") == [("Q4", "R2"), ("Q5", "R4"), ("Q0", "R3"), ("Q1", "R5")]
    assert gallery_pairs(root, "missed") == [("Q6", "R5"), ("Q3", "R3"), ("Q2", "R2")]
    fp = card(root, "false-positive", "Q0", "R3")
    assert fact(fp, "score") == "0.7000"
    assert fact(fp, "rank") == "2 of 2"  # below Q0's own R0 at 0.95
    assert fact(fp, "true-match") == "R0"
    assert fact(card(root, "false-positive", "Q4", "R2"), "true-match").startswith("none")
    assert fact(card(root, "missed", "Q6", "R5"), "score") == "not retrieved"
    assert fact(card(root, "missed", "Q3", "R3"), "rank") == "1 of 1"
    assert fact(card(root, "missed", "Q2", "R2"), "score") == "0.8500"
    # every card shows its query and reference, as an <img> or a placeholder naming the id
    for article in root.find_all("article"):
        shown = [n.attrs["data-image-id"] for n in article.find_all(data_image_id="")]
        assert shown == [article.attrs["data-query-id"], article.attrs["data-reference-id"]]


def test_missing_and_unreadable_images_become_placeholders(tmp_path: Path, bench) -> None:
    _, root = render(tmp_path, bench)
    pair = card(root, "false-positive", "Q5", "R4")  # Q5 is not an image, R4 does not exist
    assert pair.find_all("img") == []
    placeholders = pair.find_all("div", data_image_id="")
    assert [p.attrs["data-image-id"] for p in placeholders] == ["Q5", "R4"]
    assert all(
        "placeholder" in p.classes() and p.attrs["data-image-id"] in p.all_text() for p in placeholders
    )
    assert not root.find_all("img", data_image_id="R4") and not root.find_all("img", data_image_id="Q5")
    assert pair.find_all("rect") == []  # no box without an image to put it on
    assert fact(pair, "evidence") == "on a missing image"
    # an id with no path at all is a placeholder too
    queries, refs = bench
    _, root = render(tmp_path, ({k: v for k, v in queries.items() if k != "Q4"}, refs))
    (placeholder,) = card(root, "false-positive", "Q4", "R2").find_all("div", data_image_id="Q4")
    assert "placeholder" in placeholder.classes()


def test_evidence_boxes_are_drawn_scaled_to_the_thumbnail(tmp_path: Path, bench) -> None:
    _, root = render(tmp_path, bench)
    pair = card(root, "false-positive", "Q4", "R2")
    assert fact(pair, "evidence") == "crop 5 @ 256 px, model 2"
    boxes = {r.attrs["data-box-image"]: r for r in pair.find_all("rect", data_box_image="")}
    assert set(boxes) == {"Q4", "R2"}
    assert "evidence-box" in boxes["Q4"].classes()
    # 96x64 images are shown 192x128: twice the original pixels
    assert boxes["Q4"].attrs["data-box"] == "4,4,20,20"
    assert [float(boxes["Q4"].attrs[k]) for k in ("x", "y", "width", "height")] == [8, 8, 32, 32]
    assert [float(boxes["R2"].attrs[k]) for k in ("x", "y", "width", "height")] == [20, 16, 80, 64]
    (img,) = pair.find_all("img", data_image_id="Q4")
    assert (img.attrs["width"], img.attrs["height"]) == ("192", "128")
    # a box reaching outside the image is clipped to it
    (clipped,) = card(root, "false-positive", "Q1", "R5").find_all("rect", data_box_image="R5")
    assert [float(clipped.attrs[k]) for k in ("x", "y", "width", "height")] == [0, 0, 192, 60]
    # only pairs with evidence get boxes
    assert card(root, "false-positive", "Q0", "R3").find_all("rect") == []


def test_large_images_are_downscaled(tmp_path: Path, bench) -> None:
    rows = [("Q0", "R1", 0.99), *PRED_ROWS[:1]]
    _, root = render(tmp_path, bench, rows=rows)
    img, *_ = root.find_all("img", data_image_id="R1")
    assert (img.attrs["width"], img.attrs["height"]) == ("192", "144")
    decoded = Image.open(io.BytesIO(base64.b64decode(img.attrs["src"].split(",", 1)[1])))
    assert decoded.size == (192, 144)


def test_stage_table_rows_equal_the_stages(tmp_path: Path, bench) -> None:
    _, root = render(tmp_path, bench)
    (table,) = root.find_all("table", id="stage-table")
    rows = table.find_all("tr", data_stage="")
    assert [r.attrs["data-stage"] for r in rows] == [s.name for s in STAGES]
    keys = ["uAP", "recall_at_p90", "recall_at_rank1", "recall_at_rank10"]
    for row, stage in zip(rows, STAGES, strict=True):
        (name,) = row.find_all("th")
        assert name.all_text() == stage.name
        cells = row.find_all("td")
        assert [c.attrs["data-metric"] for c in cells] == [*keys, "seconds_per_query"]
        expected = [stage.figures[k] for k in keys] + [stage.seconds_per_query]
        for cell, value in zip(cells, expected, strict=True):
            if value is None:
                assert cell.attrs["data-value"] == "" and cell.all_text() == "n/a"
            else:
                assert float(cell.attrs["data-value"]) == value
    # headline tiles: the last stage
    tiles = {t.attrs["data-metric"]: t for t in root.find_all("div", data_metric="")}
    assert "0.6123" in tiles["uAP"].all_text()
    assert "1.50 s" in tiles["seconds_per_query"].all_text()


def test_p90_marker_when_reached(tmp_path: Path, bench) -> None:
    _, root = render(tmp_path, bench)
    (point,) = root.find_all("circle", **{"class": "p90-point"})
    assert float(point.attrs["data-recall"]) == pytest.approx(0.4)
    assert float(point.attrs["data-threshold"]) == pytest.approx(0.9)
    (label,) = root.find_all("text", **{"class": "p90-label"})
    assert label.all_text() == "P90: recall 0.400 at score 0.9000"
    (line,) = root.find_all("line", **{"class": "p90-threshold"})
    assert float(line.attrs["data-threshold"]) == pytest.approx(0.9)
    assert root.find_all(data_note="p90-unreached") == []
    (curve,) = root.find_all("polyline", **{"class": "pr-line"})
    assert len(curve.attrs["points"].split()) == len(PRED_ROWS) + 1  # + the start at recall 0


def test_note_when_p90_is_never_reached(tmp_path: Path, bench) -> None:
    rows = [("Q4", "R2", 0.99), ("Q5", "R1", 0.98), ("Q0", "R0", 0.5), ("Q1", "R1", 0.4)]
    assert evaluate(gt(GT_ROWS), preds(rows)).recall_at_p90 is None
    _, root = render(tmp_path, bench, rows=rows)
    assert root.find_all("circle", **{"class": "p90-point"}) == []
    assert root.find_all("line", **{"class": "p90-threshold"}) == []
    (note,) = root.find_all(data_note="p90-unreached")
    assert "never reached" in note.all_text()
    # no threshold: every ground-truth pair is missed, the unretrieved first
    assert gallery_pairs(root, "missed") == expected_galleries(rows, GT_ROWS, None, 12)[1]
    assert gallery_pairs(root, "missed")[:3] == [("Q2", "R2"), ("Q3", "R3"), ("Q6", "R5")]


def test_degenerate_inputs_do_not_crash(tmp_path: Path, bench) -> None:
    _, root = render(tmp_path, bench, rows=[])  # no predictions at all
    assert root.find_all(data_note="no-predictions")
    assert gallery_pairs(root, "false-positives") == []
    assert [q for q, _ in gallery_pairs(root, "missed")] == ["Q0", "Q1", "Q2", "Q3", "Q6"]
    no_copies = [(q, "") for q, _ in GT_ROWS]
    _, root = render(tmp_path, bench, gt_rows=no_copies, stages=[])
    assert root.find_all(data_note="no-positives")
    assert gallery_pairs(root, "missed") == []
    assert len(gallery_pairs(root, "false-positives")) == len(PRED_ROWS)
    _, root = render(tmp_path, bench, rows=[("Q0", "R0", 0.5), ("Q1", "R1", 0.5)])  # one distinct score
    assert root.find_all("svg", id="score-histogram")


def test_duplicate_predictions_are_refused_as_by_the_official_metric(tmp_path: Path, bench) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        render(tmp_path, bench, rows=[*PRED_ROWS, PRED_ROWS[0]])
    assert not (tmp_path / "run" / "report.html").exists()


def test_ids_and_text_are_escaped(tmp_path: Path, bench) -> None:
    queries, refs = bench
    odd = 'Q<b>&"x'
    page, root = render(
        tmp_path,
        ({**queries, odd: queries["Q0"]}, refs),
        rows=[(odd, "R3", 0.99), *PRED_ROWS],
        title="A <i>report</i> & more",
    )
    assert "<b>" not in page and "<i>" not in page
    (title,) = root.find_all("h1")
    assert title.all_text() == "A <i>report</i> & more"
    (img,) = root.find_all("img", data_image_id=odd)
    assert odd in img.attrs["alt"]
    assert card(root, "false-positive", odd, "R3")


# --- the chart data ------------------------------------------------------------------------------------------


def random_case(
    seed: int, n_queries: int, n_refs: int, n_preds: int
) -> tuple[GroundTruth, Predictions, list]:
    rng = np.random.default_rng(seed)
    gt_rows = [(f"Q{i}", f"R{rng.integers(n_refs)}" if i % 3 else "") for i in range(n_queries)]
    pairs = {(f"Q{rng.integers(n_queries)}", f"R{rng.integers(n_refs)}") for _ in range(n_preds)}
    truth = {(q, r) for q, r in gt_rows if r}
    pairs |= set(list(truth)[: len(truth) * 3 // 4])
    rows = [(q, r, float(rng.normal(1.0 if (q, r) in truth else 0.0, 0.5))) for q, r in sorted(pairs)]
    return gt(gt_rows), preds(rows), rows


def test_report_figures_match_numpy_and_the_official_curve() -> None:
    ground_truth, predictions, rows = random_case(0, 60, 40, 300)
    figures = report_figures(predictions, ground_truth, bins=25)
    truth = {
        (q, r)
        for q, r in zip(ground_truth.query_ids.tolist(), ground_truth.reference_ids.tolist(), strict=True)
        if r
    }
    scores = np.array([s for _, _, s in rows])
    is_true = np.array([(q, r) in truth for q, r, _ in rows])
    edges = np.histogram_bin_edges(scores, bins=25)
    np.testing.assert_allclose(figures["bin_edges"], edges)
    np.testing.assert_array_equal(figures["true_counts"], np.histogram(scores[is_true], bins=edges)[0])
    np.testing.assert_array_equal(figures["false_counts"], np.histogram(scores[~is_true], bins=edges)[0])
    assert figures["num_true"] == is_true.sum() and figures["num_false"] == (~is_true).sum()
    assert figures["true_counts"].sum() + figures["false_counts"].sum() == len(rows)
    curve = precision_recall_curve(ground_truth, predictions)
    np.testing.assert_array_equal(figures["precision"], curve.precision)
    np.testing.assert_array_equal(figures["recall"], curve.recall)
    np.testing.assert_array_equal(figures["thresholds"], curve.thresholds)
    metrics = evaluate(ground_truth, predictions)
    assert figures["metrics"] == metrics.to_dict()
    assert metrics.recall_at_p90 is not None
    assert figures["p90"]["recall"] == metrics.recall_at_p90
    assert figures["p90"]["threshold"] == metrics.threshold_at_p90
    assert figures["p90"]["precision"] >= 0.9


def test_report_figures_thin_long_curves_keeping_the_p90_point() -> None:
    ground_truth, predictions, _ = random_case(1, 400, 300, 5000)
    figures = report_figures(predictions, ground_truth, max_points=100)
    curve = precision_recall_curve(ground_truth, predictions)
    index = figures["curve_index"]
    assert figures["num_curve_points"] == len(curve.precision) > 100
    assert len(index) <= 100 and np.all(np.diff(index) > 0)
    assert index[0] == 0 and index[-1] == len(curve.precision) - 1
    np.testing.assert_array_equal(figures["precision"], curve.precision[index])
    np.testing.assert_array_equal(figures["recall"], curve.recall[index])
    p90 = figures["p90"]
    assert p90 is not None and p90["recall"] in figures["recall"].tolist()


def test_report_figures_without_copies_or_p90() -> None:
    figures = report_figures(preds(PRED_ROWS), gt([(q, "") for q, _ in GT_ROWS]))
    assert figures["p90"] is None and len(figures["precision"]) == 0
    assert figures["false_counts"].sum() == len(PRED_ROWS) and figures["true_counts"].sum() == 0
    rows = [("Q4", "R2", 0.99), ("Q0", "R0", 0.5)]
    assert report_figures(preds(rows), gt(GT_ROWS))["p90"] is None


# --- rendering in a real browser ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path: Path, bench) -> None:
    render(tmp_path, bench)
    page = tmp_path / "run" / "report.html"
    png = tmp_path / "screenshot.png"
    command = [
        str(shutil.which("chromium")),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={png}",
        "--window-size=1280,2400",
        page.as_uri(),
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=180, env={**os.environ, "HOME": str(tmp_path)}
    )
    assert png.exists(), result.stdout + result.stderr
    with Image.open(png) as shot:
        assert shot.size == (1280, 2400)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "the screenshot is (nearly) blank"
    if os.environ.get("ISC_REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(png, os.environ["ISC_REPORT_SCREENSHOT"])
