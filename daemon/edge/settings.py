"""The [edge] and [remote] configuration sections."""

from __future__ import annotations

from dataclasses import dataclass

from callboard.protocols.settings import SettingError, check_range

OFF = -1


@dataclass(frozen=True)
class EdgeSettings:
    """[edge]: the internet-facing listeners of remote activation.

    ``port`` (``--edge-port``) is the HTTPS edge (token endpoint, metadata, config) and
    ``sip_oauth_port`` (``--sip-oauth-port``) SIP over TLS with bearer tokens; -1 (the
    default) leaves a listener off, 0 takes any free port. ``cert``/``key`` name a
    certificate for the HTTPS edge (a public CA's, say); without them one is generated as
    ``<state-dir>/certs/edge.{pem,key}``. ``public_host`` is the name phones use (issuer,
    config URLs, the SIP server in configs; default: the advertised address) and the
    ``public_*port`` keys the ports they reach (0: the ports listened on).
    """

    port: int = OFF
    sip_oauth_port: int = OFF
    cert: str = ""
    key: str = ""
    public_host: str = ""
    public_port: int = 0
    public_sip_port: int = 0
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 60 * 86400  # Expressway's default refresh-token lifetime
    realm: str = "callboard"

    @property
    def enabled(self) -> bool:
        return self.port != OFF or self.sip_oauth_port != OFF

    def validate(self) -> None:
        check_range("port", self.port, OFF, 65535)
        check_range("sip_oauth_port", self.sip_oauth_port, OFF, 65535)
        check_range("public_port", self.public_port, 0, 65535)
        check_range("public_sip_port", self.public_sip_port, 0, 65535)
        check_range("access_token_ttl", self.access_token_ttl, 30, 86400)
        check_range("refresh_token_ttl", self.refresh_token_ttl, 60, 400 * 86400)
        if bool(self.cert) != bool(self.key):
            raise SettingError("cert", "give both edge.cert and edge.key, or neither")
        for name in ("realm", "public_host"):
            value = getattr(self, name)
            if value and (not value.isprintable() or any(c in value for c in '"\\ /')):
                raise SettingError(name, f"{value!r} cannot go into a URL or a header")
        if not self.realm:
            raise SettingError("realm", "a realm is needed")


@dataclass(frozen=True)
class RemoteSettings:
    """[remote]: the enterprise switch of remote activation (each device must also allow
    it: ``callboard device set NAME --allow-remote``). Off: the edge issues no token and
    every token it issued stops working."""

    enabled: bool = True
