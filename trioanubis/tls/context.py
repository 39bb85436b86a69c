"""TLS contexts: the listener side (termination) and the pool side (origination). No I/O but file reads.

Theory of operation: the config parsers (config/listeners.py, config/pools.py)
call `server_context` for a listener's `tls` and `client_context` for a pool's
`tls` while they parse, so a
certificate that is missing, unreadable, not matching its key, or a CA file
that does not load is a `TlsConfigError` that `anubis check` reports and a
reload rejects; and since every reload parses again, renewed files are
picked up by SIGHUP. The contexts are the stdlib's defaults (its cipher
choice) with TLS 1.2 as the minimum and renegotiation off, and OpenSSL's own
certificate checks on every Python (3.13 made the stdlib's stricter than
HAProxy's, nginx's and curl's: `PYTHON_313_VERIFY_FLAGS`).

Several certificates on one listener: the first is the default, and an
`sni_callback` switches to the one whose names (subjectAltName DNS entries,
else the common name) match the name the client asked for: exact names
first, then wildcards (`*.example.com` covers one label, as certificates do).

`self_signed` (for `anubis proxy --tls`) makes a localhost certificate once
with the optional `cryptography` package and keeps it in the user's cache
directory.
"""

from __future__ import annotations

import hashlib
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from trioanubis.errors import AnubisError

MINIMUM_VERSION: Final = ssl.TLSVersion.TLSv1_2
# How long the self-signed development certificate is valid.
SELF_SIGNED_DAYS: Final = 825


class TlsConfigError(AnubisError):
    """A certificate, key or CA file cannot be used; the message says which and why."""


# What Python 3.13's default contexts add to OpenSSL's verification flags. HAProxy, nginx and curl
# verify with OpenSSL's defaults, which have neither: without this, a private CA's certificate with
# no Authority Key Identifier, which they accept, fails here on 3.13 alone ("Missing Authority Key
# Identifier"), and a CA file holding an intermediate would be a trust anchor on 3.13 alone.
PYTHON_313_VERIFY_FLAGS: Final = ssl.VERIFY_X509_STRICT | getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    """TLS 1.2 at least, no renegotiation, and the same certificate checks on every Python."""
    context.minimum_version = MINIMUM_VERSION
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.verify_flags &= ~PYTHON_313_VERIFY_FLAGS
    return context


def _load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    for what, path in (("cert", cert), ("key", key)):
        if not Path(path).is_file():
            raise TlsConfigError(f"{what}: no such file {path!r}")
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in str(reason).upper():
            raise TlsConfigError(f"key: {key!r} is not the key of the certificate {cert!r}") from None
        raise TlsConfigError(f"cert: cannot load {cert!r} with key {key!r}: {reason}") from None
    except OSError as exc:
        raise TlsConfigError(f"cert: cannot read {cert!r} or {key!r}: {exc.strerror or exc}") from None


def certificate_names(cert: str) -> tuple[str, ...]:
    """The DNS names a certificate file's first certificate is for (lower case); () if unknown."""
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:  # pragma: no cover - every CPython has it
        return ()
    try:
        info = decode(cert)
    except (ssl.SSLError, OSError, ValueError):
        return ()
    names = tuple(value.lower() for kind, value in info.get("subjectAltName", ()) if kind == "DNS")
    if names:
        return names
    return tuple(value.lower() for rdn in info.get("subject", ()) for key, value in rdn
                 if key == "commonName")  # fmt: skip


def server_context(pairs: Sequence[tuple[str, str]]) -> ssl.SSLContext:
    """A server-side context for (cert, key) pairs, the first the default; TlsConfigError if one fails."""
    contexts = []
    for cert, key in pairs:
        context = _harden(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH))
        _load_pair(context, cert, key)
        contexts.append(context)
    default = contexts[0]
    if len(contexts) > 1:
        by_name: dict[str, ssl.SSLContext] = {}
        for (cert, _), context in zip(pairs, contexts, strict=True):
            for name in certificate_names(cert):
                by_name.setdefault(name, context)
        default.sni_callback = _switch_by_name(by_name)
    return default


def _switch_by_name(
    by_name: dict[str, ssl.SSLContext],
) -> Callable[[ssl.SSLObject, str | None, ssl.SSLContext], None]:
    def pick(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        if not name:
            return None
        name = name.lower()
        chosen = by_name.get(name)
        if chosen is None and "." in name:
            chosen = by_name.get("*." + name.split(".", 1)[1])
        if chosen is not None:
            sock.context = chosen
        return None

    return pick


def client_context(*, verify: bool, ca: str, cert: str, key: str) -> ssl.SSLContext:
    """A client-side context for connecting to servers; TlsConfigError if a file fails."""
    if ca and not Path(ca).is_file():
        raise TlsConfigError(f"ca: no such file {ca!r}")
    try:
        context = _harden(ssl.create_default_context(cafile=ca or None))
    except (ssl.SSLError, OSError) as exc:
        raise TlsConfigError(f"ca: cannot load {ca!r}: {getattr(exc, 'reason', None) or exc}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert or key:
        if not (cert and key):
            raise TlsConfigError("cert: a client certificate needs both cert and key")
        _load_pair(context, cert, key)
    return context


def cache_dir() -> Path:
    """Where `anubis proxy --tls` keeps its certificate: $XDG_CACHE_HOME/trioanubis or ~/.cache/trioanubis."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trioanubis"


def fingerprint(cert: str) -> str:
    """The SHA-256 fingerprint of a PEM certificate file, as browsers show it (AA:BB:…)."""
    der = ssl.PEM_cert_to_DER_cert(Path(cert).read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def self_signed(directory: Path | None = None) -> tuple[str, str]:
    """A self-signed certificate and key for localhost (made once, then reused); their paths."""
    directory = directory or cache_dir()
    cert, key = directory / "localhost.crt", directory / "localhost.key"
    if cert.is_file() and key.is_file():
        return str(cert), str(key)
    try:
        pem_cert, pem_key = _make_self_signed()
    except ImportError:
        raise AnubisError("--tls needs the cryptography package: pip install 'trioanubis[tls]'") from None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        key.touch(mode=0o600)
        key.write_bytes(pem_key)
        cert.write_bytes(pem_cert)
    except OSError as exc:
        reason = exc.strerror or exc
        raise AnubisError(f"writing the self-signed certificate to {directory}: {reason}") from None
    return str(cert), str(key)


def _make_self_signed() -> tuple[bytes, bytes]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt = x509.SubjectAlternativeName([
        x509.DNSName("localhost"), x509.DNSName("*.localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1")),
    ])  # fmt: skip
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(alt, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return certificate.public_bytes(serialization.Encoding.PEM), pem_key
