"""Test suite of the orchestrator framework and the example booking service."""
