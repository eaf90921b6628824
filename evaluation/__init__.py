"""Measures of scored rows, pure numpy: per-scenario AUC with paired bootstrap CIs, calibration maps and
drift profiles. Below serving (export fits calibration and drift references) and monitoring (which checks
and gates with them), so that neither of the two imports the other."""
import kernel  # first: it checks that each top-level name of the project resolves to this project

ADS_RELEVANCE = True  # the marker kernel.check_packages looks for
if not getattr(kernel, "ADS_RELEVANCE", False):
    raise ImportError(f"'kernel' resolves to {kernel.__file__}, which is not ads-relevance's: another installed "
                      "package shadows it; install ads-relevance into a virtual environment of its own")
