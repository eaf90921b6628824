"""Score canonical rows with an exported model: route scenarios, tokenize, group, merged forward, calibrate.

    scorer = BatchScorer(export_dir, cfg.serving, model_version="ads-relevance/3")
    scored, unknown = scorer.score(table)      # canonical rows in (pipeline.validate's accepted schema)

How one chunk (``serving.chunk_rows`` rows) is scored:
    1. routing: a known scenario scores as itself; an unknown one as ``serving.fallback_scenario``
       (``fallback`` = True) or, with ``serving.unknown_scenario = quarantine``, is returned in ``unknown``
    2. pairs (query, ad text) are tokenized and padded exactly as for training (features.tokenize), per batch
    3. rows are grouped by the scenario they score as; within a group sorted by length (less padding);
       the model switches to that scenario's weights (or session) once per group and runs batches of
       ``serving.batch_size``; a background thread tokenizes the next batch during each forward
    4. probability = sigmoid(logit), then the scenario's calibration when ``serving.calibrate``;
       results are put back in the input order

What the score columns mean (one contract for ``serving.score``, ``score_table`` and the MLflow pyfunc):
    score             the served probability: score_raw, or score_calibrated with ``serving.calibrate``
    decision          score >= the scenario's threshold fitted at export on the same kind of score (max F1
                      on the validation split: manifest ``thresholds.f1_max_raw`` or ``f1_max_calibrated``);
                      null when the export has no such threshold (exported without --valid)
    status            "scored" (as its own scenario), "fallback" (as serving.fallback_scenario), or
                      "quarantined" (not scored; ``reason`` says why, e.g. unknown_scenario)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evaluation.calibration import CALIBRATION_FILE, ScenarioCalibrator
from features.tokenize import ad_text, build_features
from kernel.config import ServingConfig
from kernel.errors import ConfigError, DataError
from modeling.base import load_saved_tokenizer
from modeling.pairs import pair_format_from
from serving.layout import BASE_DIR
from serving.scoring.plan import check_serving_limits
from serving.scoring.runtime import load_model

SCORE_COLUMNS = ("score", "score_raw", "score_calibrated", "decision")
# manifest["thresholds"] key of the decision threshold for each kind of served score (serving.calibrate).
THRESHOLD_KEYS = {False: "f1_max_raw", True: "f1_max_calibrated"}
SCORED, FALLBACK, QUARANTINED = "scored", "fallback", "quarantined"


def route_scenarios(scenarios: pa.Array | pa.ChunkedArray, known: list[str],
                    serving: ServingConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scored_as (n,) object array, fallback (n,) bool, unknown (n,) bool) for a scenario column.

    ``scored_as`` is None for rows that are quarantined (unknown scenario, no fallback configured).
    """
    names = np.asarray(scenarios.to_pylist() if len(scenarios) else [], dtype=object)
    is_known = pc.is_in(scenarios, value_set=pa.array(known, pa.string()))
    is_known = pc.fill_null(is_known, False).to_numpy(zero_copy_only=False).astype(bool)
    unknown = ~is_known
    scored_as = names.copy()
    if serving.unknown_scenario == "fallback":
        scored_as[unknown] = serving.fallback_scenario
        return scored_as, unknown, np.zeros(len(names), dtype=bool)
    scored_as[unknown] = None
    return scored_as, np.zeros(len(names), dtype=bool), unknown


def check_serving(serving: ServingConfig, known: list[str], export_dir: Path) -> None:
    if serving.unknown_scenario == "fallback" and serving.fallback_scenario not in known:
        raise ConfigError(f"serving.fallback_scenario: {serving.fallback_scenario!r} is not a scenario of the "
                          f"model in {export_dir} ({known})")
    check_serving_limits(serving)


class BatchScorer:
    """One model (serving.scoring.runtime: torch or ONNX Runtime, per-scenario precision) + its tokenizer
    (+ calibration); turns canonical tables into scores."""

    def __init__(self, export_dir: str | Path, serving: ServingConfig, model_version: str,
                 device: str | None = None):
        self.export_dir = Path(export_dir)
        self.serving = serving
        self.model_version = model_version
        # serving.engine / serving.precision / serving.threads: scenario -> (engine, precision) in self.plan
        self.model, self.plan = load_model(self.export_dir, serving, device)
        self.max_length = int(self.model.manifest["max_length"])
        self.pair_format = pair_format_from(self.model.manifest["input"].get("pair_format"))
        check_serving(serving, self.model.scenarios, self.export_dir)
        self.tokenizer = load_saved_tokenizer(self.export_dir / BASE_DIR)
        path = self.export_dir / CALIBRATION_FILE
        self.calibrator = ScenarioCalibrator.load(path) if path.is_file() else None
        if serving.calibrate and self.calibrator is None:
            raise DataError(f"serving.calibrate is on but {path} does not exist (export with --valid)")
        # Per-scenario decision thresholds for the served kind of score, fitted at export on validation
        # scores of that kind (max F1); an export without them (no --valid, or older) gives no decision.
        self.thresholds = (self.model.manifest.get("thresholds") or {}).get(THRESHOLD_KEYS[serving.calibrate]) or {}
        self._tokenizing = None  # the thread that tokenizes the next batch (created on first use)

    @property
    def scenarios(self) -> list[str]:
        return self.model.scenarios

    def batches(self, table: pa.Table, scored_as: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(scenario, row indices) per batch of ``serving.batch_size``: rows grouped by the scenario they score
        as, the one already loaded first (one switch fewer), each group sorted by the pair's length in
        characters, a proxy of its token count known before tokenizing (similar lengths share a batch: less
        padding), so that tokenizing a batch can overlap the forward of the one before."""
        chars = pc.add(pc.utf8_length(table.column("query")), pc.utf8_length(ad_text(table)))
        chars = pc.fill_null(chars, 0).to_numpy(zero_copy_only=False)
        names = [s for s in self.scenarios if s in set(scored_as.tolist())]
        if self.model.current in names:
            names.remove(self.model.current)
            names.insert(0, self.model.current)
        out = []
        for name in names:
            rows = np.flatnonzero(scored_as == name)
            rows = rows[np.argsort(chars[rows], kind="stable")]
            out += [(name, rows[s : s + self.serving.batch_size]) for s in range(0, len(rows), self.serving.batch_size)]
        return out

    def tokenize(self, table: pa.Table, scenario: str, rows: np.ndarray):
        """Token ids of rows ``rows`` of ``table``, all scored as ``scenario`` (a features.tokenize.FeatureSet):
        training's own tokenization and padding."""
        part = table.take(pa.array(rows))
        part = part.set_column(part.schema.get_field_index("scenario"), "scenario",
                               pa.repeat(pa.scalar(scenario, pa.string()), len(rows)))
        return build_features(part, self.tokenizer, self.model.task_map, self.max_length, cache_dir=None,
                              batch_size=max(len(rows), 1), pair_format=self.pair_format)

    def forward(self, scenario: str, feats) -> np.ndarray:
        """(len(feats),) float32 logits of one tokenized batch with ``scenario``'s model."""
        self.model.use(scenario)
        batch = feats.collate(np.arange(len(feats)), self.tokenizer.pad_token_id)
        return self.model.logits(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")).cpu().numpy()

    def logits(self, table: pa.Table, scored_as: np.ndarray) -> np.ndarray:
        """(n,) float32 logits in input order; row i uses scenario ``scored_as[i]`` (all non-None).

        A background thread tokenizes the next batch while this one runs the forward (both release the GIL:
        the Rust tokenizer, ONNX Runtime and torch kernels), so tokenizing costs little wall time."""
        out = np.empty(table.num_rows, dtype=np.float32)
        batches = self.batches(table, scored_as) if table.num_rows else []
        if not batches:
            return out
        pool = self._pool()
        ahead = pool.submit(self.tokenize, table, *batches[0])
        for i, (scenario, rows) in enumerate(batches):
            feats = ahead.result()
            if i + 1 < len(batches):
                ahead = pool.submit(self.tokenize, table, *batches[i + 1])
            out[rows] = self.forward(scenario, feats)
        return out

    def _pool(self):
        if self._tokenizing is None:
            from concurrent.futures import ThreadPoolExecutor

            self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        return self._tokenizing

    def scores(self, logits: np.ndarray, scored_as: np.ndarray) -> dict[str, pa.Array]:
        """The score columns of rows with these logits (all rows have a scenario to score as).

        score_raw         sigmoid(logit), float32
        score_calibrated  the scenario's calibration of score_raw (null without calibration.json)
        score             what this config serves: score_calibrated with serving.calibrate, else score_raw
        decision          score >= the scenario's threshold for that kind of score (null without one)
        """
        # score_raw as written (float32): calibration and the export's fits read exactly these values.
        raw = (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
        names = scored_as.astype(str)
        out = {"score_raw": pa.array(raw, pa.float32())}
        if self.calibrator is None:
            out["score_calibrated"] = pa.nulls(len(raw), pa.float32())
        else:
            cal = self.calibrator.apply(names, raw.astype(np.float64))
            out["score_calibrated"] = pa.array(cal.astype(np.float32), pa.float32())
        out["score"] = out["score_calibrated"] if self.serving.calibrate else out["score_raw"]
        # The threshold was fitted on float32 scores of the same kind (serving.export.validation): like with like.
        served = out["score"].to_numpy(zero_copy_only=False).astype(np.float64)
        thr = np.array([self.thresholds.get(n, np.nan) for n in names], dtype=np.float64)
        out["decision"] = pa.array(served >= np.nan_to_num(thr, nan=np.inf), pa.bool_(), mask=np.isnan(thr))
        return out

    def _annotate(self, table: pa.Table, scored_as: np.ndarray, fallback: np.ndarray,
                  scores: dict[str, pa.Array]) -> pa.Table:
        n = table.num_rows
        table = table.append_column("scored_as", pa.array(scored_as.tolist(), pa.string()))
        table = table.append_column("fallback", pa.array(fallback, pa.bool_()))
        unscored = np.asarray([s is None for s in scored_as.tolist()], dtype=bool)
        status = np.where(unscored, QUARANTINED, np.where(fallback, FALLBACK, SCORED))
        table = table.append_column("status", pa.array(status.tolist(), pa.string()))
        table = table.append_column("reason", pa.array(np.where(unscored, "unknown_scenario", None).tolist(),
                                                       pa.string()))
        for name in SCORE_COLUMNS:
            table = table.append_column(name, scores[name])
        table = table.append_column("model_version", pa.repeat(pa.scalar(self.model_version, pa.string()), n))
        for name, text in (("query_len", "query"), ("title_len", "title")):
            if name not in table.column_names:  # rows from ingestion's scoring checks carry the uncut lengths
                table = table.append_column(name, pc.cast(pc.utf8_length(table.column(text)), pa.int32()))
        return table

    def score(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """(scored rows, rows of unknown scenarios to quarantine); both keep the input's columns.

        Added columns: scored_as (str), fallback (bool), status and reason (str; see the module docstring),
        the score columns (``scores``), model_version (str), query_len and title_len (int32, characters: for
        drift monitoring). Input columns such as label and
        label_invalid pass through unchanged; the label never decides whether a row is scored.
        """
        scored_as, fallback, unknown = route_scenarios(table.column("scenario"), self.scenarios, self.serving)
        rejected = table.filter(pa.array(unknown)) if unknown.any() else table.slice(0, 0)
        if unknown.any():
            table, scored_as, fallback = table.filter(pa.array(~unknown)), scored_as[~unknown], fallback[~unknown]
        return self._annotate(table, scored_as, fallback, self.scores(self.logits(table, scored_as), scored_as)), rejected

    def score_all(self, table: pa.Table) -> pa.Table:
        """Every input row, in order; rows of unknown scenarios (quarantine mode) get a null score, status
        "quarantined" and reason "unknown_scenario"."""
        scored_as, fallback, unknown = route_scenarios(table.column("scenario"), self.scenarios, self.serving)
        keep = ~unknown
        scored = self.scores(self.logits(table.filter(pa.array(keep)), scored_as[keep]), scored_as[keep])
        rows = np.cumsum(keep) - 1  # each kept row's position among the scored ones
        take = pa.array(np.where(keep, rows, 0), mask=unknown)  # unknown rows: null in every score column
        full = {k: v.take(take) if len(v) else pa.nulls(table.num_rows, v.type) for k, v in scored.items()}
        return self._annotate(table, scored_as, fallback, full)
