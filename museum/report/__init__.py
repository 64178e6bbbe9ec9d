"""Pages a person looks at: the museum gallery and the benchmark report."""
