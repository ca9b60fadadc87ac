"""The experiment controller: storage, ExperimentService, the scheduler and its trainer pool."""
