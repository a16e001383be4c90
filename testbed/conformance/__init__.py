"""Property-based conformance of an mTLS enforcer against docs/access-flow.md.

Theory of operation
-------------------
``testbed conformance`` answers one question: does this enforcer do what the access flow
requires, for every certificate, policy and clock that can occur? Four parts do the work:

- :mod:`~testbed.conformance.model` restates docs/access-flow.md A2-A9, A14 and I5-I11 as small pure
  functions, one per requirement, written without looking at ``enforcer/decision.py``. Given the
  world (roots, applications, revocations), one request and ``now`` it says which status and reason
  codes are acceptable. Where docs/access-flow.md is silent on which of several reasons wins (an
  expired certificate with a wrong EKU), the model accepts any of them and says so.
- :mod:`~testbed.conformance.strategies` draws small, printable case *specs* with hypothesis
  (PKI shape, validity windows, extensions, policies, durations, clock jumps) and builds the
  certificates from a per-process pool of pre-generated keys (key generation is slow).
- :mod:`~testbed.conformance.targets` provisions a case on a real target (our enforcer in
  process, nginx started on loopback, or a remote enforcer through its admin API) and moves
  its clock when it can.
- :mod:`~testbed.conformance.runner` drives real TLS connections over loopback (fresh,
  kept-alive, resumed, then token replays) and compares every observation with the model.

People and service tokens (issue 17, access-flow I5-I11) ride the same cases: identity and
service-token rules in the policies, a person's session token minted with the served enforcer's
own signing key (a person reaches a No Duration application that way, I9, with no identity
provider on the wire), service-token headers for tokens made through the admin API, browsers
sent to the login route, and the login callback's own decision checked in process
(``enforcer.decision.decide`` with ``AccessRequest.identity``): the login itself needs the real
provider, which the login tests drive.

Hypothesis runs in a worker thread with blocking sockets while the trio loop in the main
thread serves the enforcer, so nothing on the wire is mocked.
"""
