"""Request and response models of the service's API (pydantic, with limits); FastAPI builds the OpenAPI from them."""

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

__all__ = ["ERRORS", "ErrorReply", "ForecastReply", "HARD_MAX_ROWS", "ID_RE", "IngestReply", "Observations",
           "RejectedRow", "SeriesInfo", "SeriesSpec"]

INT64 = dict(ge=-(2**63), le=2**63 - 1)
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
HARD_MAX_ROWS = 100_000  # schema bound; `Settings.max_rows` is the one enforced per app


class SeriesSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=256, description="[A-Za-z0-9_.:-]+, at most Settings.max_id_len")
    channels: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(min_length=1, max_length=1024)
    step: StrictInt = Field(gt=0, le=2**62, description="grid step, in the timestamps' units")
    origin: Annotated[StrictInt, Field(**INT64)] | None = None
    patch_len: StrictInt | None = Field(default=None, description="if given, must equal the model's")
    labels: list[Annotated[list[Annotated[StrictInt, Field(**INT64)]], Field(min_length=2, max_length=2)]] = Field(
        default_factory=list, max_length=10_000, description="[start, end) windows the router should not miss")


class Observations(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timestamps: list[Annotated[StrictInt, Field(**INT64)]] = Field(max_length=HARD_MAX_ROWS)
    values: list[list[StrictFloat | StrictInt | None]] = Field(
        max_length=HARD_MAX_ROWS, description="one row per timestamp; null = missing channel")


class ErrorReply(BaseModel):
    detail: str | list[dict[str, Any]] = Field(description="why: a sentence, or the fields that failed validation")


ERRORS = {code: {"model": ErrorReply} for code in (400, 401, 404, 409, 413, 422, 429, 503)}


class RejectedRow(BaseModel):
    index: int
    timestamp: int | None
    reason: str
    detail: str


class IngestReply(BaseModel):
    accepted: int
    rejected: list[RejectedRow]
    patches_queued: int
    seq: int = Field(description="log sequence number of the last row committed for this request (0: none)")


class SeriesInfo(BaseModel):
    id: str
    channels: list[str]
    step: int
    origin: int | None
    labels: list[list[int]]
    patch_len: int
    horizon: int
    quantiles: list[float]


class ForecastReply(BaseModel):
    series: str
    token: int
    origin_timestamp: int
    timestamps: list[int]
    channels: list[str]
    quantiles: list[float]
    values: list[list[list[float | None]]] = Field(description="(horizon, channel, quantile)")
    mode: str
    flops: float
    allowance: float | None
