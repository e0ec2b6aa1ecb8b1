"""Read the real vLLM server's Prometheus metrics: what it is running and how much it has generated."""

from __future__ import annotations

import httpx


def _samples(vllm_url: str, name: str, label: str = "") -> float:
    metrics = httpx.get(f"{vllm_url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{") and label in line
    )


def requests_running(vllm_url: str) -> float:
    return _samples(vllm_url, "vllm:num_requests_running")


def requests_waiting(vllm_url: str) -> float:
    return _samples(vllm_url, "vllm:num_requests_waiting")


def generated_tokens(vllm_url: str) -> float:
    """Tokens vLLM has generated since it started, over all requests."""
    return _samples(vllm_url, "vllm:generation_tokens_total")
