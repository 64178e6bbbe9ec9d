"""The continual benchmark on World v2 (issue #23; ``museum bench --world v2``), in the three parts of the first
world's (``museum.evaluation.benchmark``), which they replace when World v2's model ships:

* ``metrics``: what is read from images (both fidelity readings and their anchors, recognition, the base
  vocabulary's prompt-following, two concepts side by side);
* ``run``: the units (the base row, each method's task sequence per training seed, its upper bound and joint
  oracle), resumable and shared between processes (``museum.evaluation.benchmark.units``);
* ``results``: ``results.json`` (version 2): every figure per seed and as mean and 95% interval over seeds.
"""

from museum.evaluation.benchmark.v2.results import RESULTS_VERSION, read_results, write_results
from museum.evaluation.benchmark.v2.run import run_benchmark, task_sequence

__all__ = ["run_benchmark", "task_sequence", "write_results", "read_results", "RESULTS_VERSION"]
