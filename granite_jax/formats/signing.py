"""Sign and verify checkpoint directories with OpenSSF model signing (`model_signing`, PyPI `model-signing`).

A signed directory holds `model.sig`: a Sigstore bundle over the hash of every file in the directory (except
`model.sig` itself and git bookkeeping such as `.gitattributes`). The same files verify with model_signing's own command
line, e.g.

    python -m model_signing verify key DIR --signature DIR/model.sig --public_key KEY.pub

`VerifySpec` says what a signature must be checked against: a public key (the pair of the private key that
signed), a certificate chain (a certificate-signed directory), or a Sigstore identity and OIDC issuer (keyless
signing; needs network access to Sigstore's trust root, so it is wired but not tested offline).
`model_signing` is imported only when signing or verifying, so loading without verification never needs it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

SIGNATURE_FILE = "model.sig"


class SignatureError(ValueError):
    """A directory's signature is missing, malformed, made by another key, or does not match its files."""


@dataclasses.dataclass(frozen=True)
class VerifySpec:
    """What a directory's `model.sig` must verify against: exactly one of `public_key` (a PEM file),
    `certificate_chain` (PEM files of the chain of trust), or `identity` + `issuer` (Sigstore)."""

    public_key: str | None = None
    certificate_chain: tuple[str, ...] = ()
    identity: str | None = None
    issuer: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "certificate_chain", tuple(self.certificate_chain or ()))
        if self.identity is not None and self.issuer is None or self.issuer is not None and self.identity is None:
            raise SignatureError("Sigstore verification needs both an identity and an OIDC issuer "
                                 f"(got identity={self.identity!r}, issuer={self.issuer!r})")
        chosen = [name for name, used in [("public_key", self.public_key is not None),
                                          ("certificate_chain", bool(self.certificate_chain)),
                                          ("identity/issuer", self.identity is not None)] if used]
        if len(chosen) != 1:
            raise SignatureError(f"verification needs exactly one of public_key, certificate_chain or "
                                 f"identity/issuer; got {chosen or 'none'}")
        for path in ([self.public_key] if self.public_key else []) + list(self.certificate_chain):
            if not os.path.isfile(path):
                raise SignatureError(f"verification key/certificate {path!r} is not a file")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "verify") -> "VerifySpec":
        """From a run config's mapping, e.g. `{public_key: keys/granite.pub}`; unknown keys name `where`."""
        if not isinstance(raw, Mapping):
            raise SignatureError(f"{where}={raw!r}: expected a mapping such as {{public_key: PATH}}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise SignatureError(f"{where}: unknown keys {unknown}; expected some of {sorted(names)}")
        for name in ("public_key", "identity", "issuer"):
            if raw.get(name) is not None and not isinstance(raw[name], str):
                raise SignatureError(f"{where}.{name}={raw[name]!r}: expected a string")
        chain = raw.get("certificate_chain") or ()
        chain = [chain] if isinstance(chain, str) else chain
        if not isinstance(chain, (list, tuple)) or not all(isinstance(path, str) for path in chain):
            raise SignatureError(f"{where}.certificate_chain={raw['certificate_chain']!r}: expected a path or a "
                                 "list of paths")
        return cls(**{**raw, "certificate_chain": chain})

    def describe(self) -> str:
        if self.public_key is not None:
            return f"public key {self.public_key}"
        if self.certificate_chain:
            return f"certificate chain {list(self.certificate_chain)}"
        return f"Sigstore identity {self.identity} (issuer {self.issuer})"


def _hashing_config():
    """Every file of the directory except the signature (and git bookkeeping), as model_signing's CLI hashes."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_FILE], ignore_git_paths=True)


_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model_signing's elliptic-curve signer takes


def check_signing_key(private_key: str, password: str | None = None) -> None:
    """Refuse, before anything is exported, a key `sign_directory` cannot sign with: not a file, not a PEM
    private key (a public key, garbage), encrypted without its password, not elliptic-curve (RSA, Ed25519), or
    on a curve model_signing does not take (secp256k1)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not os.path.isfile(private_key):
        raise SignatureError(f"signing key {private_key!r} is not a file")
    with open(private_key, "rb") as f:
        data = f.read()
    try:
        key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except TypeError:
        raise SignatureError(f"signing key {private_key!r} is encrypted: give an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError(f"signing key {private_key!r} is not a PEM private key (a public key, or another "
                             "format?)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"signing key {private_key!r} is {type(key).__name__.lstrip('_')}: model signing takes "
                             f"an elliptic-curve key on {', '.join(_CURVES)}")
    if key.curve.name not in _CURVES:
        raise SignatureError(f"signing key {private_key!r} is on curve {key.curve.name}: model signing takes "
                             f"{', '.join(_CURVES)}")


def sign_directory(directory: str, private_key: str, *, certificate: str | None = None,
                   certificate_chain: tuple[str, ...] = (), password: str | None = None) -> str:
    """Write `DIR/model.sig` over every file of `directory` with an elliptic-curve private key (PEM), or, with
    `certificate`, as that key's signing certificate (plus an optional chain). Returns the signature's path."""
    from model_signing import signing

    directory = os.fspath(directory)
    for path in [private_key, *([certificate] if certificate else []), *certificate_chain]:
        if not os.path.isfile(path):
            raise SignatureError(f"signing key/certificate {path!r} is not a file")
    config = signing.Config().set_hashing_config(_hashing_config())
    if certificate is None:
        config = config.use_elliptic_key_signer(private_key=private_key, password=password)
    else:
        config = config.use_certificate_signer(private_key=private_key, signing_certificate=certificate,
                                               certificate_chain=list(certificate_chain))
    signature = os.path.join(directory, SIGNATURE_FILE)
    try:
        config.sign(directory, signature)
    except (ValueError, TypeError, OSError) as e:  # a malformed or encrypted key, unreadable files
        raise SignatureError(f"signing {directory!r} with {private_key!r} failed: {e}") from None
    return signature


def verify_directory(directory: str, spec: VerifySpec) -> None:
    """Check `DIR/model.sig` against `spec` and every file of `directory`; raise `SignatureError` naming what
    differs (a changed file, an extra or missing one, another key)."""
    from model_signing import verifying

    directory = os.fspath(directory)
    signature = os.path.join(directory, SIGNATURE_FILE)
    if not os.path.isfile(signature):
        raise SignatureError(f"{directory!r} has no {SIGNATURE_FILE}, so it cannot be verified against the "
                             f"{spec.describe()} (it is unsigned, or its signature was not copied with it)")
    config = verifying.Config().set_hashing_config(_hashing_config())
    if spec.public_key is not None:
        config = config.use_elliptic_key_verifier(public_key=spec.public_key)
    elif spec.certificate_chain:
        config = config.use_certificate_verifier(certificate_chain=list(spec.certificate_chain))
    else:
        config = config.use_sigstore_verifier(identity=spec.identity, oidc_issuer=spec.issuer)
    try:
        config.verify(directory, signature)
    except Exception as e:  # noqa: BLE001 - model_signing raises many types; each means "not verified"
        raise SignatureError(f"{signature}: verification against the {spec.describe()} failed: "
                             f"{_message(e)}") from None


def _message(e: Exception) -> str:
    """model_signing's mismatch report (a list of differences with raw digests) as the files that differ."""
    text = str(e).strip() or type(e).__name__
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", text)
    extra = re.findall(r"Extra files found in model '[^']*': ([^\"\]]+)", text)
    missing = re.findall(r"Missing files in model '[^']*': ([^\"\]]+)", text)
    parts = ([f"files changed since signing: {changed}"] if changed else []) + \
            [f"files not covered by the signature (not signed, e.g. added later): {m.strip()}" for m in extra] + \
            [f"signed files that are missing: {m.strip()}" for m in missing]
    if parts:
        return "; ".join(parts)
    return text if len(text) < 2000 else text[:2000] + " ..."
