"""The report of the benchmark on World v2 (replaces ``museum.report.benchmark_report`` when its model ships)."""
