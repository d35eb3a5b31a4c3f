"""The OpenAPI document a tap's gateway serves at ``GET /openapi.json``: its OpenAI routes and the tenant's own
account routes, with the request bodies' JSON schemas taken from the models that validate them
(``orch/protocol.py``, ``orch/embeddings.py``), so the document cannot drift from what the gateway accepts.
Every refusal is OpenAI's error object. Clients and fuzzers (schemathesis, in ``tests/integration/test_fuzz.py``)
read it; admin routes are left out (see the README).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from orch.embeddings import EmbeddingRequest
from orch.protocol import ChatCompletionRequest, CompletionRequest, CreateOwnKeyBody

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
BODIES: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/keys": CreateOwnKeyBody,
}
READS = {
    "/v1/models": "The models this tap serves, with their prices (micro-credits per 1M tokens).",
    "/v1/account": "The tenant's balance, holds and grants.",
    "/v1/usage": "The tenant's usage rows and totals.",
    "/v1/keys": "The tenant's keys (never a secret).",
}


def _answers(ok: dict[str, Any]) -> dict[str, Any]:
    """A route's responses: ``ok`` for 200, OpenAI's error object for every refusal."""
    error = {"description": "An OpenAI-shaped error.", "content": {"application/json": {"schema": ERROR}}}
    return {"200": ok, "default": error}


def document(title: str, root_path: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document of a tap mounted at ``root_path``.

    >>> doc = document("public")
    >>> sorted(doc["paths"])[:3], doc["paths"]["/v1/chat/completions"]["post"]["operationId"]
    (['/health', '/v1/account', '/v1/chat/completions'], 'createChatCompletion')
    >>> "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["required"]
    True
    """
    refs, schemas = models_json_schema(
        [(model, "validation") for model in BODIES.values()], ref_template="#/components/schemas/{model}"
    )
    json_or_stream = {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {"schema": {}}}
    paths: dict[str, Any] = {}
    for path, model in BODIES.items():
        paths.setdefault(path, {})["post"] = {
            "operationId": _operation_id(path, "post"),
            "summary": (model.__doc__ or "").strip().splitlines()[0],
            "requestBody": {"required": True, "content": {"application/json": {"schema": refs[(model, "validation")]}}},
            "responses": _answers(
                {"description": "The answer (an SSE stream when `stream` is true).", "content": json_or_stream}
            ),  # fmt: skip
        }
    for path, summary in READS.items():
        paths.setdefault(path, {})["get"] = {
            "operationId": _operation_id(path, "get"),
            "summary": summary,
            "responses": _answers(
                {"description": summary, "content": {"application/json": {"schema": {"type": "object"}}}}
            ),
        }
    paths["/health"] = {"get": {"operationId": "health", "summary": "Whether the tap's engines answer.",
                                "security": [], "responses": _answers({"description": "Healthy."})}}  # fmt: skip
    return {
        "openapi": "3.1.0",
        "info": {"title": f"llama-orch tap {title}", "version": "1"},
        "servers": [{"url": root_path or "/"}],
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation_id(path: str, method: str) -> str:
    """OpenAI's names: createChatCompletion, listModels, ..."""
    names = {
        ("post", "/v1/chat/completions"): "createChatCompletion",
        ("post", "/v1/completions"): "createCompletion",
        ("post", "/v1/embeddings"): "createEmbedding",
        ("post", "/v1/keys"): "createKey",
        ("get", "/v1/models"): "listModels",
        ("get", "/v1/account"): "getAccount",
        ("get", "/v1/usage"): "getUsage",
        ("get", "/v1/keys"): "listKeys",
    }
    return names[(method, path)]
