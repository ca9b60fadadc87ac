"""batchlab: fair optimizer comparisons across batch sizes."""
