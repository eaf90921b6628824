"""Per-scenario probability calibration, fitted on the validation split and stored with the export.

    cal = ScenarioCalibrator.fit(scenarios, labels, scores, method="isotonic")   # or "platt"
    cal.save(export_dir / CALIBRATION_FILE)            # JSON, no pickle
    cal = ScenarioCalibrator.load(export_dir / CALIBRATION_FILE)
    calibrated = cal.apply(scenarios, scores)          # unknown scenario: scores pass unchanged

Methods, per scenario:
    isotonic  a monotone step-wise map fitted by isotonic regression; stored as its knots (x, y) and
              applied by linear interpolation between them, clipped at the ends (as scikit-learn predicts).
    platt     p' = sigmoid(a * logit(p) + b): logistic regression on the logit of the raw score.
A scenario whose validation rows hold a single class cannot be calibrated; it is left as identity and
listed in ``skipped`` with the reason.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluation.metrics import EPS, check_inputs
from kernel.atomic import write_json_atomic
from kernel.errors import DataError
from kernel.storage import read_json

CALIBRATION_FILE = "calibration.json"
METHODS = ("isotonic", "platt")
FORMAT_VERSION = 1


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _fit_one(method: str, labels: np.ndarray, scores: np.ndarray) -> dict:
    # scikit-learn only fits (at export); applying a calibration is numpy, so scoring never imports it.
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
        return {"method": "isotonic", "x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()}
    # Unregularised: calibration has two parameters and plenty of rows.
    lr = LogisticRegression(C=np.inf).fit(_logit(scores)[:, None], labels)
    return {"method": "platt", "a": float(lr.coef_[0, 0]), "b": float(lr.intercept_[0])}


def _apply_one(params: dict, scores: np.ndarray) -> np.ndarray:
    if params["method"] == "isotonic":
        return np.interp(scores, params["x"], params["y"])  # clips outside [x[0], x[-1]]
    z = params["a"] * _logit(scores) + params["b"]
    return 1.0 / (1.0 + np.exp(-z))


class ScenarioCalibrator:
    """Scenario name -> fitted calibration map. Built by ``fit`` or ``from_dict``."""

    def __init__(self, method: str, params: dict[str, dict], skipped: dict[str, str] | None = None):
        self.method = method
        self.params = params  # {scenario: {"method": ..., knots or a/b}}
        self.skipped = skipped or {}  # {scenario: reason it stayed identity}

    @classmethod
    def fit(cls, scenarios, labels, scores, method: str = "isotonic") -> "ScenarioCalibrator":
        if method not in METHODS:
            raise DataError(f"calibration method {method!r}: expected one of {list(METHODS)}")
        scenarios = np.asarray(scenarios).astype(str)
        labels = np.asarray(labels)
        scores = np.asarray(scores, dtype=np.float64)
        check_inputs(labels, scores, "calibration rows")
        params, skipped = {}, {}
        for name in sorted(set(scenarios.tolist())):
            m = scenarios == name
            y = labels[m].astype(np.int64)
            if y.min() == y.max():
                skipped[name] = f"only one class among {int(m.sum())} validation rows"
                continue
            params[name] = _fit_one(method, y, scores[m])
        return cls(method, params, skipped)

    def apply(self, scenarios: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, (n,) float64 in the input order."""
        scenarios = np.asarray(scenarios).astype(str)
        out = np.asarray(scores, dtype=np.float64).copy()
        if len(scenarios) != len(out):
            raise DataError(f"calibration: {len(scenarios)} scenarios but {len(out)} scores")
        for name in set(scenarios.tolist()) & self.params.keys():
            m = scenarios == name
            out[m] = _apply_one(self.params[name], out[m])
        return out

    @property
    def scenarios(self) -> list[str]:
        return sorted(self.params)

    def to_dict(self) -> dict:
        return {"format_version": FORMAT_VERSION, "method": self.method, "scenarios": self.params,
                "skipped": self.skipped}

    @classmethod
    def from_dict(cls, d: dict, source: str = "calibration") -> "ScenarioCalibrator":
        """Validate and rebuild; DataError names the source and the offending key."""
        if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{source}: not a calibration (format_version {FORMAT_VERSION} expected)")
        params = d.get("scenarios")
        if not isinstance(params, dict):
            raise DataError(f"{source}: key 'scenarios' must be a mapping")
        for name, p in params.items():
            method = p.get("method") if isinstance(p, dict) else None
            need = {"isotonic": ("x", "y"), "platt": ("a", "b")}.get(method)
            if need is None:
                raise DataError(f"{source}: scenarios.{name}.method must be one of {list(METHODS)}")
            missing = [k for k in need if k not in p]
            if missing:
                raise DataError(f"{source}: scenarios.{name}: missing keys {missing}")
            if method == "isotonic" and (len(p["x"]) != len(p["y"]) or not len(p["x"])
                                         or np.any(np.diff(p["x"]) < 0)):
                raise DataError(f"{source}: scenarios.{name}: x and y must be equal-length, non-empty, x sorted")
        return cls(d.get("method", "isotonic"), params, d.get("skipped", {}))

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary name, then rename)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ScenarioCalibrator":
        return cls.from_dict(read_json(path, "calibration file"), source=str(path))
