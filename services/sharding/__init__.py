"""Data sharding service: prepares datasets once and hands out each shard's example order."""
