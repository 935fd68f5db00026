"""Async pipeline-parallel transport: one header and one payload per stage hop."""
