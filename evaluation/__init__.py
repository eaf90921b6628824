"""Measures of scored rows, pure numpy: per-scenario AUC with paired bootstrap CIs, calibration maps and
drift profiles. Below serving (export fits calibration and drift references) and monitoring (which checks
and gates with them), so that neither of the two imports the other."""
