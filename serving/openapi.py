"""The OpenAPI 3.1 description of the operator API (``GET /api/v1/openapi.json``).

Kept beside the handler (:mod:`medssl.serving.api`); ``tests/serving/test_serving_api.py``
checks that every route the handler serves is described here and the other way round.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OPENAPI"]


def _page_params(*extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        *extra,
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
        },
        {
            "name": "offset",
            "in": "query",
            "schema": {"type": "integer", "minimum": 0, "default": 0},
        },
    ]


def _get(summary: str, params: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "parameters": params or [],
            "responses": {
                "200": {"description": "OK (JSON)"},
                "401": {"description": "no credentials"},
            },
        }
    }


def _post(
    summary: str, body: dict[str, Any], params: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [
                *(params or []),
                {
                    "name": "X-CSRF-Token",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": False,
                "content": {
                    "application/json": {"schema": {"type": "object", "properties": body}},
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                **body,
                                "csrf_token": {"type": "string"},
                                "next": {"type": "string"},
                            },
                        }
                    },
                },
            },
            "responses": {
                "200": {"description": "the job after the action (JSON)"},
                "303": {"description": "a console form: back to the page"},
                "401": {"description": "no credentials"},
                "403": {"description": "missing or wrong CSRF token, or another origin"},
                "404": {"description": "no such job or destination"},
                "409": {"description": "the job's state does not allow it (the reason is given)"},
            },
        }
    }


_REF = {
    "name": "ref",
    "in": "path",
    "required": True,
    "description": "a job id, or a StudyInstanceUID (its newest job)",
    "schema": {"type": "string"},
}
_REASON = {"reason": {"type": "string", "description": "why (recorded with the action)"}}

#: The document.
OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "medssl gateway operator API",
        "version": "1",
        "description": "Studies, jobs, deliveries, quarantine and refused "
        "associations of one gateway, and the operator's actions. No "
        "patient-identifying values unless api.show_patient_id is set.",
    },
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "basic": {"type": "http", "scheme": "basic"},
        }
    },
    "security": [{"bearer": []}, {"basic": []}],
    "paths": {
        "/api/v1/openapi.json": _get("this document"),
        "/api/v1/session": _get("who you are and the CSRF token for actions"),
        "/api/v1/studies": _get(
            "jobs newest first, filtered and paged",
            _page_params(
                {
                    "name": "state",
                    "in": "query",
                    "description": "received, queued, running, sending, done, failed, "
                    "dead-letter, cancelled (repeat or comma-separate)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "since",
                    "in": "query",
                    "description": "received at or after (epoch s or ISO 8601)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "until",
                    "in": "query",
                    "description": "received before (epoch s or ISO 8601)",
                    "schema": {"type": "string"},
                },
                {
                    "name": "uid",
                    "in": "query",
                    "description": "StudyInstanceUID, SeriesInstanceUID, result "
                    "SOPInstanceUID or AccessionNumber",
                    "schema": {"type": "string"},
                },
            ),
        ),
        "/api/v1/studies/{ref}": _get(
            "one job: stages, routed series, outputs, deliveries, actions", [_REF]
        ),
        "/api/v1/studies/{ref}/retry": _post("retry a failed or dead-letter job", _REASON, [_REF]),
        "/api/v1/studies/{ref}/redeliver": _post(
            "send a done job's results to a destination again",
            {**_REASON, "destination": {"type": "string"}},
            [_REF],
        ),
        "/api/v1/studies/{ref}/cancel": _post("cancel a received or queued job", _REASON, [_REF]),
        "/api/v1/deliveries": _get(
            "deliveries, latest attempts first",
            _page_params(
                {
                    "name": "state",
                    "in": "query",
                    "description": "pending, sent, dead-letter",
                    "schema": {"type": "string"},
                }
            ),
        ),
        "/api/v1/quarantine": _get("quarantined inputs, newest first", _page_params()),
        "/api/v1/quarantine/purge": _post(
            "delete quarantined inputs older than N days",
            {**_REASON, "older_than_days": {"type": "number", "minimum": 0}},
        ),
        "/api/v1/refusals": _get("refused associations, newest first", _page_params()),
        "/api/v1/counters": _get("jobs per state and the queue"),
        "/api/v1/overview": _get(
            "queue, studies finished per hour (24 h), failures (24 h), destinations"
        ),
        "/api/v1/destinations": _get("destinations, up or down by their last delivery attempt"),
        "/api/v1/actions": _get("the latest operator actions", _page_params()),
        "/api/v1/config": _get("the effective configuration, secrets masked"),
    },
}
