"""The trainer: Ray actors that run trial attempts for the controller (services.trainer.actor)."""
