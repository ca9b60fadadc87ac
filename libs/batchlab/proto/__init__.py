"""Python code generated from protos/batchlab/v1 (`python -m batchlab.proto.generate`)."""
