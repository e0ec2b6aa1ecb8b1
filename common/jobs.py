"""The Redis layout shared by the gateway (producer) and explainer workers (consumers).

Everything crossing the process boundary is JSON or protobuf, never pickle:

* ``sl:jobs`` — a stream of *turns*: one entry per queued job, with the ``explanation_id`` and
  ``tenant`` of the job whose enqueue added it. Workers read it through the consumer group
  ``explainers``; an entry stays pending until a worker acknowledges it, so a worker that dies
  mid-job leaves it for another to claim. Which job a turn runs is decided when a worker first
  takes it, by the fair queue below, and kept in ``sl:jobs:assigned``, so a claimant runs the
  same job. The group's lag is the number of jobs not yet started and its pending count the
  jobs in workers' hands: the backlog the gateway bounds and the signal an autoscaler reads
  (KEDA's ``redis-streams`` trigger: ``stream`` JOB_STREAM, ``consumerGroup`` WORKER_GROUP,
  ``lagCount``).
* ``sl:jobs:queue`` — a sorted set of the queued (not yet started) explanation ids, scored by
  their virtual start time (start-time fair queueing): a tenant's job starts at the virtual
  time ``sl:jobs:clock`` (the start time of the latest job taken) or one share after its
  previous job, whichever is later. A tenant's jobs are spaced ``1 / worker_share`` apart, so
  tenants with queued work get the workers in proportion to their shares, and a tenant with
  none queued goes straight to the front (see common/fair_queue.py). ``sl:jobs:next-start`` is
  a hash from tenant to the virtual time its next job may start at, at the earliest.
* ``sl:jobs:assigned`` — a hash from a turn's entry id to the explanation id it runs, from the
  moment a worker takes the turn until the turn is acknowledged.
* ``sl:exp:{id}`` — a hash per explanation: ``tenant``, ``attempts``, ``explanation``, the
  serialized ``sightline.v1.Explanation`` (whose tensors are raw bytes with dtype and shape),
  ``summary``, the serialized ``ExplanationSummary`` without its state, and ``state``, the
  ``ExplanationState`` number, kept beside the record so listing never reads whole results;
  until the record is final also ``job``, the :class:`ExplanationJob` as JSON (a request's pictures
  travel in it, base64, so they expire and are deleted with it); while it runs
  ``progress``, the serialized ``ExplanationProgress`` its worker last published (a few times a
  second at most, so the record itself is never rewritten for progress); and, once someone asked
  for it to stop, ``cancel``, who asked, which the worker reads at its next checkpoint.
* ``sl:tenant:{tenant}:explanations`` — a sorted set per tenant of its explanation ids scored
  by creation time in milliseconds: the index ListExplanations pages through.
* ``sl:tenant:{tenant}:inflight`` — a sorted set per tenant of its unfinished explanation ids
  scored by the millisecond their lease ends; workers remove an id when its record becomes
  final, and an expired lease (a job lost with its gateway or its data) frees the slot itself.
* ``sl:tenant:{tenant}:rate`` — the tenant's request-rate state (see server/limits.py).
* ``sl:explanations:done`` — a pub/sub channel; a worker publishes an explanation id when
  its record reaches a final state, so waiting gateways wake without polling.
* ``sl:pass-seconds`` — a hash from served model name to the seconds one forward pass takes per
  token of the sequence, as the workers last measured it: what EstimateExplanation multiplies
  the cost model's passes by.
* ``sl:catalog`` — the serialized ``ListMethodsResponse`` of the workers' method registry, and
  ``sl:models`` — a hash from served model name to a JSON :class:`ModelRecord` (the weights
  digest the workers hold, the vocabulary size). The gateway reads both, so it validates
  explain requests without importing any model code.
* ``sl:hs:{tenant}:{digest}:{sha256}`` — the explainers' hidden-state cache, per tenant (see
  explainers/hidden_cache.py).

Tenant names are restricted (see ``TENANT_NAME``) so that they never break a key apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sightline.v1 import types_pb2

# What an autoscaler watches (KEDA redis-streams: stream, consumerGroup, lagCount): see the module docstring.
JOB_STREAM = "sl:jobs"
WORKER_GROUP = "explainers"
JOB_QUEUE_KEY = "sl:jobs:queue"
JOB_CLOCK_KEY = "sl:jobs:clock"
JOB_NEXT_START_KEY = "sl:jobs:next-start"
JOB_ASSIGNED_KEY = "sl:jobs:assigned"
DONE_CHANNEL = "sl:explanations:done"
CATALOG_KEY = "sl:catalog"
MODELS_KEY = "sl:models"
PASS_SECONDS_KEY = "sl:pass-seconds"

# Fields of the per-explanation hash.
RECORD_TENANT = "tenant"
RECORD_ATTEMPTS = "attempts"
RECORD_EXPLANATION = "explanation"
RECORD_SUMMARY = "summary"
RECORD_STATE = "state"
# The states a record never leaves once written (its result, its failure, or its cancellation).
FINAL_STATES = (
    types_pb2.EXPLANATION_STATE_SUCCEEDED,
    types_pb2.EXPLANATION_STATE_FAILED,
    types_pb2.EXPLANATION_STATE_CANCELLED,
)
RECORD_JOB = "job"
RECORD_PROGRESS = "progress"
RECORD_CANCEL = "cancel"

# Fields of a turn in the job stream.
TURN_EXPLANATION_ID = "explanation_id"
TURN_TENANT = "tenant"

# What a tenant name may be: it is part of Redis keys, log lines and error messages.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def redis_text(value: bytes | str) -> str:
    """A Redis reply field as text, from a client that decodes replies or one that does not."""
    return value.decode() if isinstance(value, bytes) else value


def worker_group_info(groups: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The workers' consumer group among XINFO GROUPS' replies; None until a worker has created it."""
    return next((group for group in groups if redis_text(group["name"]) == WORKER_GROUP), None)


def explanation_key(explanation_id: str) -> str:
    return f"sl:exp:{explanation_id}"


def tenant_explanations_key(tenant: str) -> str:
    return f"sl:tenant:{tenant}:explanations"


def tenant_inflight_key(tenant: str) -> str:
    return f"sl:tenant:{tenant}:inflight"


def tenant_rate_key(tenant: str) -> str:
    return f"sl:tenant:{tenant}:rate"


def new_explanation_id() -> str:
    # 128 random bits: ids are capabilities for ASYNC fetches, so they must not be guessable.
    return "exp_" + secrets.token_hex(16)


@dataclass(frozen=True)
class ModelRecord:
    """What explainer workers publish about the weights they hold."""

    weights_digest: str
    vocab_size: int

    def to_json(self) -> str:
        return json.dumps({"weights_digest": self.weights_digest, "vocab_size": self.vocab_size})

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelRecord:
        fields = json.loads(text)
        return cls(weights_digest=str(fields["weights_digest"]), vocab_size=int(fields["vocab_size"]))


@dataclass(frozen=True)
class MethodRequest:
    name: str
    params: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class SpanRequest:
    start: int
    end: int
    label: str = ""


@dataclass(frozen=True)
class ExplainOptions:
    """Everything about an explanation besides its methods (see ExplainSpec in protos/sightline/v1/types.proto)."""

    # Indices into the generated tokens; empty explains them all.
    output_indices: list[int] = field(default_factory=list)
    # Empty, one foil for every target, or one per explained token.
    foil_token_ids: list[int] = field(default_factory=list)
    # "logprob", "probability" or "logit".
    score: str = "logprob"
    # "token", "word" or "span".
    granularity: str = "token"
    spans: list[SpanRequest] = field(default_factory=list)
    absolute: bool = False
    # "none", "l1" or "max_abs".
    normalization: str = "none"
    faithfulness: bool = False
    step_scores_top_k: int = 5
    # The grid a request's pictures are explained on (ExplainSpec.images); 0 takes the model's own grid.
    image_grid_rows: int = 0
    image_grid_cols: int = 0

    def to_json(self) -> str:
        fields = dict(self.__dict__)
        fields["spans"] = [span.__dict__ for span in self.spans]
        return json.dumps(fields)

    @classmethod
    def from_json(cls, text: str) -> ExplainOptions:
        fields = json.loads(text)
        fields["spans"] = [SpanRequest(**span) for span in fields.get("spans", [])]
        return cls(**fields)


def _image_messages(text: str) -> list[dict[str, Any]]:
    """Chat messages whose content is a list of parts: {"type": "text", "text": ...} or {"type": "image"} (the next
    picture of the job's ``images``, in order)."""
    messages = json.loads(text)
    if not isinstance(messages, list):
        raise TypeError("image_messages is not a list of messages")
    decoded = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "text":
                parts.append({"type": "text", "text": str(part["text"])})
            elif part["type"] == "image":
                parts.append({"type": "image"})
            else:
                raise TypeError(f"unknown content part type {str(part['type'])[:20]!r}")
        decoded.append({"role": str(message["role"]), "content": parts})
    return decoded


def _images(text: str) -> list[bytes]:
    encoded = json.loads(text)
    if not isinstance(encoded, list) or not all(isinstance(item, str) for item in encoded):
        raise TypeError("images is not a list of base64 strings")
    try:
        return [base64.b64decode(item, validate=True) for item in encoded]
    except binascii.Error as exc:
        raise TypeError(f"an image is not valid base64: {exc}") from exc


def _chat(text: str) -> list[dict[str, str]]:
    messages = json.loads(text)
    if not isinstance(messages, list):
        raise TypeError("chat is not a list of messages")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]


@dataclass(frozen=True)
class ExplanationJob:
    """One explanation to compute, exactly as the serving engine produced its tokens."""

    explanation_id: str
    tenant: str
    model: str
    weights_digest: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    served_logprobs: list[float] | None
    methods: list[MethodRequest]
    traceparent: str
    options: ExplainOptions = field(default_factory=ExplainOptions)
    # The chat messages the prompt was rendered from, when it was a chat: the worker marks each prompt token's
    # role (template, system prompt, a message's content) from them. None: a text or token-id prompt.
    chat: list[dict[str, str]] | None = None
    # A request with pictures: its chat messages with picture parts in place ({"type": "image"}), and the pictures'
    # encoded bytes in message order. The bytes travel base64 in this job's JSON, so they live exactly as long as
    # the job (the record's TTL; deleted with the job field when the record is final).
    image_messages: list[dict[str, Any]] | None = None
    images: list[bytes] = field(default_factory=list)

    def to_fields(self) -> dict[str, str]:
        chat = {} if self.chat is None else {"chat": json.dumps(self.chat)}
        if self.image_messages is not None:
            chat["image_messages"] = json.dumps(self.image_messages)
            chat["images"] = json.dumps([base64.b64encode(image).decode() for image in self.images])
        return {
            "explanation_id": self.explanation_id,
            "tenant": self.tenant,
            "model": self.model,
            "weights_digest": self.weights_digest,
            "prompt_token_ids": json.dumps(self.prompt_token_ids),
            "output_token_ids": json.dumps(self.output_token_ids),
            "served_logprobs": json.dumps(self.served_logprobs),
            "methods": json.dumps([{"name": m.name, "params": m.params} for m in self.methods]),
            "traceparent": self.traceparent,
            "options": self.options.to_json(),
            **chat,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_fields())

    @classmethod
    def from_json(cls, text: str | bytes) -> ExplanationJob:
        """Decode a record's ``job`` field; raises ``ValueError`` on a malformed one."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed explanation job: {exc!r}") from exc
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise ValueError("malformed explanation job: not an object of strings")
        return cls.from_fields(fields)

    @classmethod
    def from_fields(cls, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> ExplanationJob:
        """Decode a stream entry; raises ``ValueError`` on a malformed one."""
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in fields.items()
        }
        try:
            served = json.loads(text["served_logprobs"])
            return cls(
                explanation_id=text["explanation_id"],
                tenant=text["tenant"],
                model=text["model"],
                weights_digest=text["weights_digest"],
                prompt_token_ids=[int(t) for t in json.loads(text["prompt_token_ids"])],
                output_token_ids=[int(t) for t in json.loads(text["output_token_ids"])],
                served_logprobs=None if served is None else [float(x) for x in served],
                methods=[
                    MethodRequest(name=str(m["name"]), params=dict(m.get("params") or {}))
                    for m in json.loads(text["methods"])
                ],
                traceparent=text.get("traceparent", ""),
                options=ExplainOptions.from_json(text["options"]) if "options" in text else ExplainOptions(),
                chat=_chat(text["chat"]) if "chat" in text else None,
                image_messages=_image_messages(text["image_messages"]) if "image_messages" in text else None,
                images=_images(text["images"]) if "images" in text else [],
            )
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed explanation job: {exc!r}") from exc
