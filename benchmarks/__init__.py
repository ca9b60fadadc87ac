"""batchlab benchmarks: comparisons measured side by side in one run (`make bench`)."""
