"""batchlab.rpc: shared gRPC glue for the services (server builder, health, auth, metrics)."""
