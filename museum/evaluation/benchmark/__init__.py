"""The continual benchmark (``museum bench``; METHODS.md, "Continual evaluation protocol"), in three parts:

* ``metrics``: what is measured (CLIP-I and CLIP-T through the protocol's ``alignment``, KID, shape
  recognition) and the matrix summaries (A, F, BWT, curves);
* ``run``: the run itself, unit by unit (each method's task sequence and gate curve, the upper bound, the base
  row), resumable and shared between processes;
* ``results``: the folder's progress files and ``results.json``, which the report and docs/BENCHMARKS.md read.
"""

from museum.evaluation.benchmark.metrics import (
    HIGHER_IS_BETTER, METRICS, EvaluatorFeatures, Prototypes, build_prototypes, curves, kid, score_images,
    shape_renders, summarize,
)
from museum.evaluation.benchmark.results import (
    RESULTS, RESULTS_VERSION, Settings, collect_results, gate_curve_results, read_results, write_results,
)
from museum.evaluation.benchmark.run import FULL, GATE_BETAS, QUICK, run_benchmark
from museum.evaluation.benchmark.units import GRID_IMAGES, BenchmarkError, grid_row

__all__ = [
    "run_benchmark", "collect_results", "write_results", "read_results", "kid", "build_prototypes", "Prototypes",
    "score_images", "summarize", "curves", "shape_renders", "EvaluatorFeatures", "BenchmarkError", "Settings",
    "METRICS", "HIGHER_IS_BETTER", "RESULTS", "RESULTS_VERSION", "QUICK", "FULL", "GATE_BETAS", "GRID_IMAGES",
    "gate_curve_results", "grid_row",
]
