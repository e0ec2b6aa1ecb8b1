"""Fixtures of the fault tests: each module starts and breaks its own components (see cluster.py)."""

from __future__ import annotations

import pytest

from deploy.local_stack import LocalStack


@pytest.fixture(scope="session")
def vllm_port(stack: LocalStack) -> int:
    """The session stack's vLLM, which fault tests only generate with and never break."""
    return stack.config.vllm_port
