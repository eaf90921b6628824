"""The monitoring report a team reads every morning, and the history it is drawn from.

Real components only: MLflow on a sqlite file (and once a real ``mlflow server`` on 127.0.0.1), Parquet
files, the page rendered by a real headless Chromium. Every number of the report that compares is checked
against an independent recomputation (sklearn, numpy, a join done here with pandas).
"""
from __future__ import annotations

import html.parser
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from evaluation.drift import save_reference
from evaluation.metrics import (
    average_precision,
    bootstrap_auc,
    pr_curve_points,
    roc_curve_points,
    scenario_seed,
    weighted_auc,
)
from kernel.config import config_from_dict
from kernel.mlflow_client import MlflowTracker
from kernel.tracking import SpooledTracker
from monitoring.check import headline_metrics, run
from monitoring.history import read_history, scenario_key
from monitoring.report import MIN_BIN_ROWS
from tests.mlflow_testkit import MlflowServer
from tests.monitoring_testkit import CATEGORIES
from tests.test_monitoring_check import keyed, profile_of, scored_split, token_jaccard

EXPERIMENT = "ads-relevance"
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


# --- the data: real WDC pairs, two real weak models ----------------------------------------------------------


def with_score(t: pa.Table, scores: np.ndarray, version: str) -> pa.Table:
    t = t.set_column(t.column_names.index("score"), "score", pa.array(scores, pa.float32()))
    return t.set_column(t.column_names.index("model_version"), "model_version", pa.array([version] * len(t)))


def variant(t: pa.Table, i: int) -> pa.Table:
    """Run i's traffic: a random 80% of the rows, the shoes scores pushed up by 0.05 * i (drift grows)."""
    rng = np.random.default_rng(100 + i)
    t = t.take(np.sort(rng.permutation(len(t))[: int(0.8 * len(t))]))
    s = t["score"].to_numpy().astype(np.float64)
    s[t["scenario"].to_numpy(zero_copy_only=False) == "shoes"] += 0.05 * i
    return t.set_column(t.column_names.index("score"), "score", pa.array(np.clip(s, 0, 1), pa.float32()))


@pytest.fixture(scope="module")
def cfg():
    return config_from_dict({"monitoring": {"bootstrap_rounds": 200}})


@pytest.fixture(scope="module")
def candidate() -> pa.Table:
    """The candidate's batch-scoring output of the valid split (overlap model), with the row key."""
    t = keyed(scored_split("valid"))
    return with_score(t, t["score"].to_numpy(), "ads-relevance/4")


@pytest.fixture(scope="module")
def champion(candidate) -> pa.Table:
    """The champion (token Jaccard) on the same input: shuffled, 15% of the rows missing."""
    t = with_score(candidate, token_jaccard(candidate["query"].to_pylist(), candidate["title"].to_pylist()),
                   "ads-relevance/2")
    keep = np.random.default_rng(5).permutation(len(t))[: int(0.85 * len(t))]
    return t.take(keep)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def reference(candidate, cfg, workdir) -> Path:
    return save_reference(profile_of(candidate, cfg), workdir / "reference.json")


@pytest.fixture(scope="module")
def logged(candidate, reference, workdir) -> dict:
    """Three finished monitoring runs of ads-relevance/1..3 logged through the check, plus runs the history
    must not return: an export run, a failed monitoring run, a monitoring run of another model."""
    uri = f"sqlite:///{workdir}/mlflow.db"
    cfg = config_from_dict({"monitoring": {"bootstrap_rounds": 20}})
    runs = []
    for i in (1, 2, 3):
        path = workdir / f"scores-{i}.parquet"
        pq.write_table(variant(candidate, i), path)
        tracker = MlflowTracker(uri, EXPERIMENT)
        tracker.start(run_name="monitoring-check")
        summary = run(cfg, path, reference, workdir / f"monitor-{i}", tracker=tracker,
                      model_version=f"ads-relevance/{i}").info["summary"]
        tracker.end()
        runs.append({"run_id": tracker.run_id, "summary": summary})
        if i == 1:
            client = tracker.client
            client.set_terminated(client.create_run(tracker.experiment_id, tags={"stage": "export"}).info.run_id)
            failed = MlflowTracker(uri, EXPERIMENT)
            failed.start()
            failed.set_tags({"stage": "monitor", "model_name": "ads-relevance", "model_version": "ads-relevance/9"})
            failed.end("FAILED")
            other = MlflowTracker(uri, EXPERIMENT)
            other.start()
            run(cfg, path, reference, workdir / "monitor-other", tracker=other, model_version="other-model/1")
            other.end()
            runs_other = other.run_id
    return {"uri": uri, "runs": runs, "other": runs_other}


@pytest.fixture(scope="module")
def report(candidate, champion, reference, logged, cfg, workdir) -> dict:
    """Today's check of ads-relevance/4 against the champion, with the trend of the three earlier runs."""
    scored = workdir / "scores-4"
    pq.write_to_dataset(candidate, scored, partition_cols=["scenario"])  # another row order than the champion's
    champ_dir = workdir / "champion-scores"
    champ_dir.mkdir()
    half = len(champion) // 2
    pq.write_table(champion.slice(0, half), champ_dir / "part-00000.parquet")
    pq.write_table(champion.slice(half), champ_dir / "part-00001.parquet")
    history = read_history(logged["uri"], EXPERIMENT, model_name="ads-relevance")
    tracker = MlflowTracker(logged["uri"], EXPERIMENT)
    tracker.start(run_name="monitoring-check")
    summary = run(cfg, scored, reference, workdir / "monitor-4", tracker=tracker, model_version="ads-relevance/4",
                  champion={"scored": champ_dir}, history=history).info["summary"]
    tracker.end()
    return {"summary": summary, "out": workdir / "monitor-4", "history": history, "run_id": tracker.run_id,
            "html": (workdir / "monitor-4" / "report.html").read_text()}


# --- parsing the page ---------------------------------------------------------------------------------------


class Page(html.parser.HTMLParser):
    """The tables of the page (by id or by class + data-scenario) as lists of rows of (attrs, text) cells,
    the <img> sources, and the text inside <header>."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[tuple[dict, str]]]] = {}
        self.images: list[str] = []
        self.header = ""
        self.row_attrs: dict[str, list[dict]] = {}
        self._table = self._cell = None
        self._in_header = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "header":
            self._in_header = True
        elif tag == "table":
            self._table = a.get("id") or f"{a.get('class')}:{a.get('data-scenario')}"
            self.tables[self._table] = []
            self.row_attrs[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
            self.row_attrs[self._table].append(a)
        elif tag in ("td", "th") and self._table:
            self._cell = [a, ""]
        elif tag == "img":
            self.images.append(a["src"])

    def handle_endtag(self, tag):
        if tag == "header":
            self._in_header = False
        elif tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append((self._cell[0], self._cell[1].strip()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data
        if self._in_header:
            self.header += data


# --- curves -------------------------------------------------------------------------------------------------


def test_roc_and_pr_points_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 800)
    p = np.round(rng.uniform(size=800) * 0.6 + 0.3 * y, 2)  # coarse: many ties
    w = rng.uniform(0.1, 3.0, 800)
    for weights in (None, w):
        roc = roc_curve_points(y, p, weights)
        fpr, tpr, thr = roc_curve(y, p, sample_weight=weights, drop_intermediate=False)
        np.testing.assert_allclose(roc["fpr"], fpr, atol=1e-12)
        np.testing.assert_allclose(roc["tpr"], tpr, atol=1e-12)
        np.testing.assert_array_equal(roc["thresholds"], thr)
        # the trapezoid area under the points is the AUC with ties counted one half
        assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(roc_auc_score(y, p, sample_weight=weights))
        assert weighted_auc(y, p, weights) == pytest.approx(np.trapezoid(roc["tpr"], roc["fpr"]), abs=1e-12)
        pr = pr_curve_points(y, p, weights)
        prec, rec, thr = precision_recall_curve(y, p, sample_weight=weights, drop_intermediate=False)
        np.testing.assert_allclose(pr["precision"], prec[::-1], atol=1e-12)  # sklearn: recall decreasing
        np.testing.assert_allclose(pr["recall"], rec[::-1], atol=1e-12)
        np.testing.assert_array_equal(pr["thresholds"][1:], thr[::-1])
        ap = np.sum(np.diff(pr["recall"]) * pr["precision"][1:])
        assert ap == pytest.approx(average_precision_score(y, p, sample_weight=weights), abs=1e-12)
        assert average_precision(y, p, weights) == pytest.approx(ap, abs=1e-15)
    assert roc_curve_points(np.ones(5), p[:5]) is None and pr_curve_points(np.zeros(5), p[:5]) is None
    assert average_precision(np.zeros(5), p[:5]) is None
    assert roc_curve_points(np.array([]), np.array([])) is None


def test_every_scenario_gets_its_roc_pr_plot(report):
    page = Page(report["html"])
    for name in CATEGORIES:
        curves = [i for i in page.images if i.endswith(f"_{name}_curves.png")]
        assert len(curves) == 1 and (report["out"] / curves[0]).stat().st_size > 10_000


# --- champion against candidate ------------------------------------------------------------------------------


def naive_paired_bootstrap(y, a, b, rounds, seed):
    """An independent paired bootstrap: sklearn AUCs of both models on each stratified resample."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    diffs = []
    for _ in range(rounds):
        idx = np.r_[rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    return np.percentile(diffs, [2.5, 97.5])


def test_champion_table_matches_an_independent_recomputation(report, candidate, champion, cfg):
    comp = report["summary"]["champion"]
    key = ["source_file", "source_row"]
    cand = candidate.select([*key, "scenario", "label", "score"]).to_pandas()
    champ = champion.select([*key, "score"]).to_pandas()
    joined = cand.merge(champ, on=key, suffixes=("_cand", "_champ"), validate="one_to_one")
    joined = joined.sort_values(key, kind="stable")  # the comparison's row order: by key
    assert comp["version"] == "ads-relevance/2"  # from the champion's model_version column
    assert comp["candidate_version"] == "ads-relevance/4"
    assert comp["rows_matched"] == len(joined) == len(champion)
    assert comp["candidate_rows_unmatched"] == len(candidate) - len(joined)
    assert comp["champion_rows_unmatched"] == 0
    assert set(comp["scenarios"]) == set(CATEGORIES)
    rows = {r[0][1]: r for r in Page(report["html"]).tables["champion"][1:]}
    for name, c in comp["scenarios"].items():
        g = joined[joined["scenario"] == name]
        y, a, b = g["label"].to_numpy(), g["score_cand"].to_numpy(np.float64), g["score_champ"].to_numpy(np.float64)
        assert c["rows"] == len(g) and c["positives"] == y.sum()
        assert c["candidate_auc"] == pytest.approx(roc_auc_score(y, a), abs=1e-12)
        assert c["champion_auc"] == pytest.approx(roc_auc_score(y, b), abs=1e-12)
        assert c["delta"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b), abs=1e-12)
        # paired: both models on the very same resamples (the documented draw of evaluation.metrics)
        rounds = cfg.monitoring.bootstrap_rounds
        same = (bootstrap_auc(y, a, None, rounds, scenario_seed(cfg.monitoring.seed, name))
                - bootstrap_auc(y, b, None, rounds, scenario_seed(cfg.monitoring.seed, name)))
        assert (c["ci_low"], c["ci_high"]) == pytest.approx(tuple(np.percentile(same, [2.5, 97.5])), abs=1e-12)
        # and the same interval, up to Monte Carlo noise, as a bootstrap written independently with sklearn
        lo, hi = naive_paired_bootstrap(y, a, b, rounds, seed=11)
        assert c["ci_low"] == pytest.approx(lo, abs=0.012) and c["ci_high"] == pytest.approx(hi, abs=0.012)
        verdict = "worse" if c["ci_high"] < 0 else "better" if c["ci_low"] > 0 else "within noise"
        assert c["verdict"] == verdict
        # the page shows those numbers
        cells = [t for _, t in rows[name]]
        assert cells[1:5] == [str(len(g)), str(int(y.sum())), f"{roc_auc_score(y, a):.4f}", f"{roc_auc_score(y, b):.4f}"]
        assert cells[5] == f"{c['delta']:+.4f} [{c['ci_low']:.4f}, {c['ci_high']:.4f}]" and cells[6] == verdict
        assert ("breach" in rows[name][5][0].get("class", "")) == (verdict == "worse")
    macro = np.mean([comp["scenarios"][n]["candidate_auc"] - comp["scenarios"][n]["champion_auc"] for n in CATEGORIES])
    assert comp["auc_macro"]["delta"] == pytest.approx(macro)
    # stored and logged the same
    assert json.loads((report["out"] / "summary.json").read_text())["champion"] == json.loads(json.dumps(comp))
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{report['out'].parent}/mlflow.db").get_run(report["run_id"])
    assert run.data.tags["champion_version"] == "ads-relevance/2"
    for name in CATEGORIES:
        assert run.data.metrics[f"traffic/auc_delta_vs_champion/{name}"] == pytest.approx(
            comp["scenarios"][name]["delta"])


def test_a_champion_equal_to_the_candidate_is_within_noise(candidate, reference, tmp_path):
    cfg = config_from_dict({"monitoring": {"bootstrap_rounds": 30}})
    pq.write_table(candidate, tmp_path / "scores.parquet")
    comp = run(cfg, tmp_path / "scores.parquet", reference, tmp_path / "o",
               champion={"scored": tmp_path / "scores.parquet"}).info["summary"]["champion"]
    for c in comp["scenarios"].values():
        assert (c["delta"], c["ci_low"], c["ci_high"], c["verdict"]) == (0.0, 0.0, 0.0, "within noise")


# --- reliability bins ----------------------------------------------------------------------------------------


def test_bin_counts_match_numpy_histogram_and_thin_bins_are_grey(report, candidate, cfg):
    page = Page(report["html"])
    scn = candidate["scenario"].to_numpy(zero_copy_only=False)
    scores = candidate["score"].to_numpy().astype(np.float64)
    bins = cfg.monitoring.calibration_bins
    thin = 0
    for name in CATEGORIES:
        expected, _ = np.histogram(scores[scn == name], bins=np.arange(bins + 1) / bins)
        table = page.tables[f"bins:{name}"]
        row = next(r for r in table if r[0][1] == "rows")
        counts = [int(a["data-n"]) for a, _ in row[1:]]
        assert counts == expected.tolist() and [int(t) for _, t in row[1:]] == counts
        assert [b["n"] for b in report["summary"]["metrics"][name]["reliability"]] == counts
        grey = [("few" in a.get("class", "")) for a, _ in row[1:]]
        assert grey == [n < MIN_BIN_ROWS for n in counts]
        thin += sum(grey)
    assert thin > 0  # the data has thin high-score bins: the de-emphasis is exercised


# --- history and trends --------------------------------------------------------------------------------------


def test_history_reads_back_the_monitoring_runs_oldest_first(logged, report):
    hist = report["history"]  # read before today's check: the three earlier runs
    assert [h["run_id"] for h in hist] == [r["run_id"] for r in logged["runs"]]  # no export/failed/other runs
    now = read_history(logged["uri"], EXPERIMENT, model_name="ads-relevance")  # today's run has finished since
    assert [h["run_id"] for h in now] == [*(r["run_id"] for r in logged["runs"]), report["run_id"]]
    assert now[:3] == hist
    assert [h["model_version"] for h in hist] == ["ads-relevance/1", "ads-relevance/2", "ads-relevance/3"]
    assert [h["start_time"] for h in hist] == sorted(h["start_time"] for h in hist)
    for h, r in zip(hist, logged["runs"]):
        s = r["summary"]
        assert h["metrics"] == headline_metrics(s)  # exactly what was logged
        for name in CATEGORIES:
            assert h["scenarios"][scenario_key(name)]["auc"] == s["metrics"][name]["auc"]
            assert h["scenarios"][scenario_key(name)]["psi_score"] == s["drift"]["scenarios"][name]["psi_score"]
        assert h["overall"]["auc_macro"] == s["overall"]["auc_macro"]
    assert read_history(logged["uri"], EXPERIMENT, "ads-relevance", limit=2) == now[-2:]  # the newest two
    every = read_history(logged["uri"], EXPERIMENT)  # any model: the other model's run too
    assert [h["run_id"] for h in every] == [now[0]["run_id"], logged["other"], *(h["run_id"] for h in now[1:])]
    assert read_history(logged["uri"], "no-such-experiment") == []


def test_trend_shows_the_earlier_runs_then_this_run(report, logged):
    page = Page(report["html"])
    summary = report["summary"]
    assert [h["run_id"] for h in summary["history"]] == [r["run_id"] for r in logged["runs"]]
    for name in CATEGORIES:
        table = page.tables[f"trend:{name}"]
        attrs = page.row_attrs[f"trend:{name}"][1:]
        body = table[1:]
        assert len(body) == len(logged["runs"]) + 1
        assert [a.get("class") for a in attrs] == [None] * len(logged["runs"]) + ["current"]  # this run last
        for row, r in zip(body, logged["runs"]):
            s = r["summary"]
            assert row[2][1] == r["run_id"] and row[3][1] == s["model_version"]
            assert float(row[4][0]["data-v"]) == s["metrics"][name]["auc"]
            assert float(row[5][0]["data-v"]) == s["drift"]["scenarios"][name]["psi_score"]
        now = body[-1]
        assert now[0][1] == "this run" and now[3][1] == "ads-relevance/4"
        assert float(now[4][0]["data-v"]) == summary["metrics"][name]["auc"]
        assert float(now[5][0]["data-v"]) == summary["drift"]["scenarios"][name]["psi_score"]
        assert any(i.endswith(f"_{name}_trend.png") for i in page.images)
    # the drift of shoes grows run after run (0.05 more per run), as the trend must show
    psi = [float(r[5][0]["data-v"]) for r in page.tables["trend:shoes"][1:-1]]
    assert psi == sorted(psi) and psi[-1] > psi[0]


def test_trend_with_gaps_unlabelled_rows_and_odd_scenario_names(candidate, reference, tmp_path):
    """A run without labels (no AUC), earlier runs that lack a scenario or its PSI, a scenario name that
    MLflow metric keys must clean: the trend still draws, and a missing value is shown as such."""
    odd = "shoes.png (EU)/ä"
    t = candidate.drop_columns(["label"])
    scn = t["scenario"].to_numpy(zero_copy_only=False)
    t = t.set_column(t.column_names.index("scenario"), "scenario", pa.array(np.where(scn == "shoes", odd, scn)))
    pq.write_table(t, tmp_path / "unlabelled.parquet")
    history = [{"run_id": "r1", "start_time": "2026-11-01T00:00:00+00:00", "model_version": "ads-relevance/1",
                "scenarios": {scenario_key(odd): {"auc": 0.8, "psi_score": 0.1}}},
               {"run_id": "r2", "start_time": "2026-11-02T00:00:00+00:00", "model_version": None,
                "scenarios": {"cameras": {"auc": 0.7}}}]
    summary = run(config_from_dict({}), tmp_path / "unlabelled.parquet", reference, tmp_path / "o",
                  history=history).info["summary"]
    page = Page((tmp_path / "o" / "report.html").read_text())
    rows = page.tables[f"trend:{odd}"][1:]
    assert [r[3][1] for r in rows] == ["ads-relevance/1", "–", "ads-relevance/4"]  # the current: from the data
    assert [r[4][0]["data-v"] for r in rows] == ["0.8", "", ""]  # no AUC for r2 nor for this unlabelled run
    assert [r[5][1] for r in rows] == ["0.1000", "–", "–"]  # an unseen scenario has no PSI
    assert float(page.tables["trend:cameras"][1:][1][4][0]["data-v"]) == 0.7
    assert summary["metrics"] is None and not any(i.endswith("_curves.png") for i in page.images)
    assert len([i for i in page.images if i.endswith("_trend.png")]) == len(CATEGORIES)
    assert all((tmp_path / "o" / i).is_file() for i in page.images)


def test_history_over_a_real_mlflow_server(candidate, reference, tmp_path):
    """The job's own tracker (MLflow behind the spool) against a real server: the tags and metrics come
    back over HTTP, and the next check draws them."""
    cfg = config_from_dict({"monitoring": {"bootstrap_rounds": 10}})
    server = MlflowServer(tmp_path / "server")
    uri = server.start()
    try:
        logged = []
        for i in (1, 2):
            path = tmp_path / f"scores-{i}.parquet"
            pq.write_table(variant(candidate, i), path)
            tracker = SpooledTracker(MlflowTracker(uri, EXPERIMENT, 10), tmp_path / "spool", 30)
            tracker.start(run_name="monitoring-check")
            summary = run(cfg, path, reference, tmp_path / f"m{i}", tracker=tracker,
                          model_version=f"ads-relevance/{i}").info["summary"]
            tracker.end()
            assert tracker.unsent == 0
            logged.append((tracker.run_id, summary))
        hist = read_history(uri, EXPERIMENT, model_name="ads-relevance")
        assert [(h["run_id"], h["model_version"]) for h in hist] == [(r, s["model_version"]) for r, s in logged]
        for h, (_, s) in zip(hist, logged):
            assert h["metrics"] == headline_metrics(s)
        summary = run(cfg, tmp_path / "scores-2.parquet", reference, tmp_path / "m3", history=hist).info["summary"]
        assert [h["scenarios"] for h in summary["history"]] == [h["scenarios"] for h in hist]
    finally:
        server.stop()


# --- the folder, and the page in a real browser -------------------------------------------------------------


def test_report_folder_is_self_contained_and_drops_stale_plots(report, candidate, reference, tmp_path):
    out = tmp_path / "o"
    shutil.copytree(report["out"], out)
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    page = Page((out / "report.html").read_text())
    assert files == {"report.html", "summary.json", *page.images}  # nothing else, nothing missing
    assert len(page.images) == 3 * len(CATEGORIES)
    shoes = tmp_path / "shoes.parquet"
    pq.write_table(candidate.filter(pc.equal(candidate["scenario"], "shoes")), shoes)
    run(config_from_dict({"monitoring": {"bootstrap_rounds": 0}}), shoes, reference, out)
    page = Page((out / "report.html").read_text())
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(Path(i).name for i in page.images)
    assert not list(out.rglob(".*"))  # no temporary files


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail(f"chromium is needed to check the report in a real browser; install it with: {CHROMIUM_INSTALL}")
    return exe


def render(exe: str, url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"chromium failed on {url}: {proc.stderr[-2000:]}"
    return proc


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    exe = chromium()
    url = (report["out"] / "report.html").resolve().as_uri()
    shot, blank = tmp_path / "report.png", tmp_path / "blank.png"
    (tmp_path / "blank.html").write_text("<!DOCTYPE html><html><body></body></html>")
    render(exe, url, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000")
    render(exe, (tmp_path / "blank.html").as_uri(), tmp_path / "profile", f"--screenshot={blank}",
           "--window-size=1400,1000")
    assert png_size(shot) == (1400, 1000)
    assert shot.stat().st_size > 5 * blank.stat().st_size  # text, tables and plots, not an empty page
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert (pixels < 200).mean() > 0.02  # a visible share of the page is ink

    dom = render(exe, url, tmp_path / "profile", "--dump-dom").stdout
    page = Page(dom)
    assert "Relevance monitoring report" in page.header and "ads-relevance/4" in page.header
    assert "ads-relevance/2" in page.header  # the champion it is compared with
    champion_rows = page.tables["champion"]
    assert [r[0][1] for r in champion_rows[1:len(CATEGORIES) + 1]] == sorted(CATEGORIES)
    assert len(page.images) == 3 * len(CATEGORIES)
    for src in page.images:
        path = report["out"] / src
        assert path.is_file(), f"<img src={src!r}> of the rendered page does not exist"
        w, h = png_size(path)
        assert w > 300 and h > 200
