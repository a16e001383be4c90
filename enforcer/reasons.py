"""The stable reason codes of SPEC.md: what a 403, 404 or 421 says and the access log records."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a request was denied, or what was noticed on the way to a decision."""

    NO_CERTIFICATE = "no_certificate"
    UNTRUSTED_ISSUER = "untrusted_issuer"
    MISSING_INTERMEDIATE = "missing_intermediate"
    CERTIFICATE_EXPIRED = "certificate_expired"
    CERTIFICATE_NOT_YET_VALID = "certificate_not_yet_valid"
    INVALID_CHAIN = "invalid_chain"
    UNSUPPORTED_KEY = "unsupported_key"
    REVOKED = "revoked"
    POLICY_DENIED = "policy_denied"
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    MISDIRECTED = "misdirected"
    NO_APPLICATION = "no_application"


# Short bodies for denials: vague to the peer on purpose (the header carries the code, the
# access log carries the detail), like cryptography's bare InvalidToken.
DENIAL_BODIES: dict[Reason, str] = {
    Reason.NO_CERTIFICATE: "A valid client certificate is required.",
    Reason.UNTRUSTED_ISSUER: "The client certificate is not trusted for this hostname.",
    Reason.MISSING_INTERMEDIATE: "The client certificate chain is incomplete.",
    Reason.CERTIFICATE_EXPIRED: "The client certificate has expired.",
    Reason.CERTIFICATE_NOT_YET_VALID: "The client certificate is not yet valid.",
    Reason.INVALID_CHAIN: "The client certificate chain is invalid.",
    Reason.UNSUPPORTED_KEY: "The client certificate chain uses an unsupported key or signature.",
    Reason.REVOKED: "The client certificate has been revoked.",
    Reason.POLICY_DENIED: "Access denied by policy.",
    Reason.MISDIRECTED: "Misdirected request: Host does not match the TLS server name.",
    Reason.NO_APPLICATION: "No application is configured for this hostname.",
}
