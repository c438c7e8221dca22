"""REST API request and response schemas (pydantic): validation, and the OpenAPI document.

The same classes validate request bodies, shape responses and, through pydantic's JSON
Schema (2020-12, the dialect of OpenAPI 3.1), describe both in ``/api/openapi.json``, so
the document cannot drift from what the code accepts and answers.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DeviceName = str
Onboarding = Literal["activation-code", "autoregistration", "ivr"]
DeviceStateName = Literal["provisioned", "awaiting-activation", "active"]
CodeStateName = Literal["issued", "used", "released", "expired"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- requests ---------------------------------------------------------------------------------


class LineIn(Strict):
    directory_number: str = Field(min_length=1, max_length=32)
    display_name: str = Field(default="", max_length=100)
    auth_name: str = Field(default="", max_length=64)
    auth_password: str = Field(default="", max_length=128)


class DeviceCreate(Strict):
    model: str = Field(min_length=1, max_length=40, examples=["8841"])
    mac: str | None = Field(
        default=None, max_length=40, description="blank or null: a BAT placeholder"
    )
    description: str = Field(default="", max_length=200)
    user: str = Field(default="", max_length=64, description="the owner user's name")
    lines: list[LineIn] = Field(default_factory=list, max_length=16)
    requires_activation: bool | None = Field(
        default=None, description="null: follow the model's default"
    )


class DeviceUpdate(Strict):
    """Fields left out (or null) stay as they are."""

    description: str | None = Field(default=None, max_length=200)
    user: str | None = Field(
        default=None, max_length=64, description="the owner user's name; empty: no user"
    )
    lines: list[LineIn] | None = Field(
        default=None,
        max_length=16,
        description="every line of the device; a line without auth_password keeps the "
        "password its directory number had",
    )


class MacChange(Strict):
    mac: str | None = Field(max_length=40, description="null: blank the MAC (re-onboard)")


class RequirementChange(Strict):
    required: bool


class DefaultChange(Strict):
    onboarding: Onboarding


class ImportRequest(Strict):
    csv: str = Field(max_length=4_000_000, description="the file `callboard import` reads")
    dummy_mac: bool = False


class UserCreate(Strict):
    name: str = Field(min_length=1, max_length=64)
    display_name: str = Field(default="", max_length=200)
    email: str = Field(default="", max_length=254)
    admin: bool = False
    password: str | None = Field(default=None, min_length=8, max_length=1024)


class PasswordChange(Strict):
    password: str = Field(min_length=8, max_length=1024)


class TokenCreate(Strict):
    name: str = Field(min_length=1, max_length=64)
    read_only: bool = False
    user: str = Field(default="", max_length=64, description="act as this user (optional)")


# -- responses ---------------------------------------------------------------------------------


class Problem(Out):
    """RFC 9457 problem details."""

    model_config = ConfigDict(extra="allow")
    type: str = "about:blank"
    title: str
    status: int
    detail: str


class CodeOut(Out):
    state: CodeStateName
    issued: str | None
    expires: str | None
    used: str | None
    code: str | None = Field(
        default=None, description="1234-5678-9012-3456; only where the caller may see it"
    )


class LineOut(Out):
    directory_number: str
    display_name: str
    auth_name: str
    has_password: bool


class DeviceOut(Out):
    name: str
    model: str
    description: str
    user: str
    state: DeviceStateName
    requires_activation: bool
    lines: list[LineOut]
    activation_code: CodeOut | None


class Registration(Out):
    aor: str
    contact: str
    transport: str
    source: str
    user_agent: str | None
    expires_in: float
    registered: str | None
    client_cert_sha256: str | None
    node: str | None = None  # the node holding it (cluster-wide bindings)


class DeviceDetail(DeviceOut):
    created: str | None
    updated: str | None
    activated: str | None
    mic_sha256: str | None
    bound_to: str
    registrations: list[Registration]


class DevicePage(Out):
    total: int
    offset: int
    limit: int
    items: list[DeviceOut]


class DeviceCode(CodeOut):
    device: str


class CodeSent(Out):
    device: str
    to: str
    expires: str | None


class ExportRow(Out):
    device: str
    model: str
    description: str
    user: str
    directory_number: str
    activation_code: str
    expires: str
    bound_to: str


class ImportResult(Out):
    imported: int
    devices: list[str]


class DefaultOut(Out):
    model: str
    model_id: str
    onboarding: Onboarding


class UserOut(Out):
    name: str
    display_name: str
    email: str
    admin: bool
    has_password: bool
    devices: int


class TokenOut(Out):
    name: str
    read_only: bool
    user: str
    created_by: str
    created: str | None


class TokenCreated(TokenOut):
    token: str = Field(description="shown once; only its hash is stored")


class OwnDeviceOut(Out):
    name: str
    model: str
    description: str
    lines: list[str]
    state: DeviceStateName
    activation_code: str | None = Field(description="shown when ready to activate and allowed")
    expires: str | None


class StatusOut(Out):
    model_config = ConfigDict(extra="allow")
    devices: int
    counters: dict[str, Any] = Field(default_factory=dict)
