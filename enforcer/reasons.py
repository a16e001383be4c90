"""The reason codes of docs/access-flow.md: what a 403, 404 or 421 says and the access log notes."""

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
    REVOCATION_UNKNOWN = "revocation_unknown"
    POLICY_DENIED = "policy_denied"
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    MISDIRECTED = "misdirected"
    NO_APPLICATION = "no_application"
    # Identity (access-flow I1-I12)
    LOGIN_REQUIRED = "login_required"
    IDENTITY_DENIED = "identity_denied"
    LOGIN_FAILED = "login_failed"
    SERVICE_TOKEN_INVALID = "service_token_invalid"
    SERVICE_TOKEN_EXPIRED = "service_token_expired"


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
    Reason.REVOCATION_UNKNOWN: "The client certificate's revocation status is unknown.",
    Reason.POLICY_DENIED: "Access denied by policy.",
    Reason.MISDIRECTED: "Misdirected request: Host does not match the TLS server name.",
    Reason.NO_APPLICATION: "No application is configured for this hostname.",
    Reason.LOGIN_REQUIRED: "Login required: sign in with your identity provider.",
    Reason.IDENTITY_DENIED: "Access denied for this identity.",
    Reason.LOGIN_FAILED: "The login could not be completed; start again.",
    Reason.SERVICE_TOKEN_INVALID: "The service token is invalid.",
    Reason.SERVICE_TOKEN_EXPIRED: "The service token has expired.",
}


# The gRPC status of each reason code, for denials of gRPC requests (access-flow D4): 16
# UNAUTHENTICATED when who the client is could not be established (no certificate, a chain that
# fails, a bad token), 7 PERMISSION_DENIED when it was and a policy said no; 14 UNAVAILABLE for
# a request on the wrong connection (421: a new connection to the right hostname serves it) and
# 12 UNIMPLEMENTED for a hostname without an application (gRPC's own reading of HTTP 404).
GRPC_STATUS: dict[Reason, int] = {
    Reason.NO_CERTIFICATE: 16,
    Reason.UNTRUSTED_ISSUER: 16,
    Reason.MISSING_INTERMEDIATE: 16,
    Reason.CERTIFICATE_EXPIRED: 16,
    Reason.CERTIFICATE_NOT_YET_VALID: 16,
    Reason.INVALID_CHAIN: 16,
    Reason.UNSUPPORTED_KEY: 16,
    Reason.REVOKED: 16,
    Reason.REVOCATION_UNKNOWN: 16,
    Reason.POLICY_DENIED: 7,
    Reason.TOKEN_INVALID: 16,
    Reason.TOKEN_EXPIRED: 16,
    Reason.MISDIRECTED: 14,
    Reason.NO_APPLICATION: 12,
    Reason.LOGIN_REQUIRED: 16,
    Reason.IDENTITY_DENIED: 7,
    Reason.LOGIN_FAILED: 16,
    Reason.SERVICE_TOKEN_INVALID: 16,
    Reason.SERVICE_TOKEN_EXPIRED: 16,
}
