"""What ``mlflow deployments predict`` hands a ``bentoml`` deployment, read into audio and form fields,
and the service's answers turned back into the pyfunc's rows."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from whisper_bento.deployment_state import invalid


def audio_and_params(inputs: Any) -> tuple[list, dict[str, Any]]:
    """The audio cells and decoding params of ``inputs``: what ``mlflow models predict`` takes
    (a serving payload, as a dict or as ``pandas.read_json`` reads one), a DataFrame with an
    ``audio`` column, a list of cells, or one cell."""
    import pandas as pd

    if isinstance(inputs, pd.DataFrame):
        if "audio" in inputs.columns or len(inputs.columns) == 1 and inputs.columns[0] not in _PAYLOAD_KEYS:
            return list(inputs["audio" if "audio" in inputs.columns else inputs.columns[0]]), {}
        inputs = {column: inputs[column].dropna().to_dict() for column in inputs.columns}
    params: dict[str, Any] = {}
    if isinstance(inputs, dict):
        params = dict(inputs.get("params") or {})
        if "dataframe_split" in inputs:
            split = inputs["dataframe_split"]
            columns = list(split.get("columns") or ["audio"])
            index = columns.index("audio") if "audio" in columns else 0
            cells = [row[index] if isinstance(row, (list, tuple)) else row for row in json_rows(split.get("data"))]
        elif "dataframe_records" in inputs:
            cells = json_rows(inputs["dataframe_records"])
        elif "inputs" in inputs or "instances" in inputs or "audio" in inputs:
            value = next(inputs[k] for k in ("inputs", "instances", "audio") if k in inputs)
            if isinstance(value, dict) and "audio" in value:
                value = value["audio"]
            cells = json_rows(value) if isinstance(value, (list, tuple, dict)) else [value]
        else:
            raise invalid(
                f"No audio in the input (keys: {', '.join(map(str, inputs))}); send "
                '{"dataframe_split": {"columns": ["audio"], "data": [["<base64 audio>"]]}}.'
            )
    else:
        cells = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    cells = [cell.get("audio") if isinstance(cell, dict) else cell for cell in cells]  # records
    if not cells:
        raise invalid("The input has no rows of audio.")
    return cells, params


_PAYLOAD_KEYS = ("dataframe_split", "dataframe_records", "inputs", "instances", "params")


def json_rows(value: Any) -> list:
    """A JSON list, or the same list as ``pandas.read_json`` turned it into ({0: ..., 1: ...})."""
    if isinstance(value, dict):
        return [value[k] for k in sorted(value, key=lambda k: int(k))]
    return list(value or [])


def audio_bytes(cell: Any) -> bytes:
    if isinstance(cell, (bytes, bytearray)):
        return bytes(cell)
    if isinstance(cell, str):
        try:
            return base64.b64decode(cell, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("An audio cell is not base64: send each recording's bytes base64-encoded.") from None
    raise invalid(f"An audio cell is a {type(cell).__name__}: send bytes or a base64 string.")


def form_fields(params: dict[str, Any]) -> dict[str, str]:
    fields = {}
    for key, value in params.items():
        if value is None:
            continue
        fields[key] = value if isinstance(value, str) else json.dumps(value)
    return fields


def result_row(response) -> dict[str, Any]:
    """A service answer as the pyfunc's row; undecodable audio is an error row, not a failure."""
    if response.status_code == 200:
        body = response.json()
        return {k: body[k] for k in ("text", "language", "language_probability", "duration", "segments")} | {"error": ""}
    error = error_body(response)
    if response.status_code in (400, 413) and (error.get("param") == "file" or error.get("code") == "audio_too_long"):
        from mlflow_faster_whisper.wrapper import error_row

        return error_row(error_message(response))
    raise MlflowException(f"The deployment refused the request: {error_message(response)}", INVALID_PARAMETER_VALUE)


def error_body(response) -> dict[str, Any]:
    try:
        return response.json().get("error") or {}
    except ValueError:
        return {}


def error_message(response) -> str:
    return error_body(response).get("message") or f"HTTP {response.status_code}: {response.text[:500]}"
