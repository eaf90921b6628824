"""The scheduled job on top of the stages: ``python -m job.run`` (see job.run)."""
import kernel  # first: it checks that each top-level name of the project resolves to this project

ADS_RELEVANCE = True  # the marker kernel.check_packages looks for
if not getattr(kernel, "ADS_RELEVANCE", False):
    raise ImportError(f"'kernel' resolves to {kernel.__file__}, which is not ads-relevance's: another installed "
                      "package shadows it; install ads-relevance into a virtual environment of its own")
