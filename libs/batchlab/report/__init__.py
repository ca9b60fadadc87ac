"""batchlab.report: tables and plots built from stored results and configurations."""
