"""batchlab.client: the experiment client (gRPC) and the embedded local stack."""

from batchlab.client.experiments import ExperimentClient, default_controller_address
from batchlab.client.stack import Stack, default_state_dir

__all__ = ["ExperimentClient", "Stack", "default_controller_address", "default_state_dir"]
