"""Pure attestation core: parse evidence, replay event logs, derive dstack identity, verify.

Nothing here opens sockets; files are read only by the collateral store and policy loader.
"""

from teemesh.attest.dstack import DstackIdentity, KeyProvider, compose_hash, default_app_id
from teemesh.attest.evidence import Analysis, Evidence, analyze, load_evidence
from teemesh.attest.policy import Policy, Reason, Refusal, load_policy
from teemesh.attest.quote import Quote, parse_quote
from teemesh.attest.verify import Verdict, verify_evidence

__all__ = [
    "Analysis",
    "DstackIdentity",
    "Evidence",
    "KeyProvider",
    "Policy",
    "Quote",
    "Reason",
    "Refusal",
    "Verdict",
    "analyze",
    "compose_hash",
    "default_app_id",
    "load_evidence",
    "load_policy",
    "parse_quote",
    "verify_evidence",
]
