"""batchlab's deployables: one package per service (servicer, server wiring, storage)."""
