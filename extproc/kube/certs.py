"""The injector's own certificates, for clusters without cert-manager: ``tollgate injector-certs``.

One run (a Job at install, then a CronJob) makes sure that:

1. the Secret ``tollgate-injector-tls`` holds a CA and a serving certificate for the injector's
   Service names, in cert-manager's layout (``ca.crt``, ``tls.crt``, ``tls.key``), so the
   Deployment mounts it the same way on both paths;
2. the MutatingWebhookConfiguration's ``caBundle`` is that CA.

It keeps what is still good: the CA lives 10 years and is reused, so renewing the serving certificate
(1 year, renewed in its last 30 days) never changes the caBundle, and the injector, which re-reads its
files, switches certificates without one failed admission. Only a missing, unreadable or expiring CA
is replaced, and then the caBundle is patched in the same run. Two runs at once cannot both create
the Secret: the loser reads the winner's (HTTP 409), and the caBundle patch is conditional on the
configuration's resourceVersion.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from extproc.kube.api import ApiError, KubeApi

log = logging.getLogger("tollgate.injector")

CA_DAYS = 3650
SERVING_DAYS = 365
RENEW_BEFORE_DAYS = 30


@dataclass(frozen=True, slots=True)
class Bundle:
    ca_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes


def service_names(service: str, namespace: str) -> list[str]:
    """The names the API server may use for the webhook's Service (it uses ``svc.ns.svc``)."""
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def new_ca(common_name: str = "tollgate-injector-ca", days: int = CA_DAYS) -> tuple[bytes, bytes]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_serving(ca_pem: bytes, ca_key_pem: bytes, names: list[str], days: int = SERVING_DAYS) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key is not an EC key")
    key = _key()
    now = _now()
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _fresh(pem: bytes, renew_before: dt.timedelta) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return False
    return cert.not_valid_after_utc - renew_before > _now()


def _covers(pem: bytes, names: list[str]) -> bool:
    try:
        sans = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (ValueError, x509.ExtensionNotFound):
        return False
    return set(names) <= set(sans.value.get_values_for_type(x509.DNSName))


def _signed_by(pem: bytes, ca_pem: bytes) -> bool:
    try:
        x509.load_pem_x509_certificate(pem).verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def settle_bundle(old: Bundle | None, names: list[str], renew_before: dt.timedelta) -> Bundle:
    """``old`` if it is still good for ``names``; else renewed, keeping the CA when it can."""
    if old and _fresh(old.ca_pem, renew_before + dt.timedelta(days=SERVING_DAYS)):
        ca_pem, ca_key = old.ca_pem, old.ca_key_pem
    else:
        ca_pem, ca_key = new_ca()
    if old and ca_pem == old.ca_pem and _fresh(old.cert_pem, renew_before) and _covers(old.cert_pem, names) \
            and _signed_by(old.cert_pem, ca_pem):
        return old
    cert, key = new_serving(ca_pem, ca_key, names)
    return Bundle(ca_pem, ca_key, cert, key)


# --------------------------------------------------------------------------- the Secret and the webhook configuration

_FIELDS = {"ca.crt": "ca_pem", "ca.key": "ca_key_pem", "tls.crt": "cert_pem", "tls.key": "key_pem"}


def _from_secret(secret: dict[str, Any]) -> Bundle | None:
    data = secret.get("data") or {}
    try:
        return Bundle(**{attr: base64.b64decode(data[k]) for k, attr in _FIELDS.items()})
    except (KeyError, ValueError, TypeError):
        return None


def _secret(name: str, namespace: str, b: Bundle, resource_version: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/name": "tollgate-injector",
                                       "app.kubernetes.io/managed-by": "tollgate-injector-certs"}}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls", "metadata": meta,
            "data": {k: base64.b64encode(getattr(b, attr)).decode() for k, attr in _FIELDS.items()}}


@dataclass(frozen=True)
class CertTarget:
    namespace: str
    secret: str = "tollgate-injector-tls"
    service: str = "tollgate-injector"
    webhook: str = "tollgate-injector"  # the MutatingWebhookConfiguration
    renew_before: dt.timedelta = dt.timedelta(days=RENEW_BEFORE_DAYS)


def ensure_certificates(api: KubeApi, t: CertTarget) -> tuple[Bundle, list[str]]:
    """Make the Secret and the caBundle right; returns the bundle and what was changed."""
    names = service_names(t.service, t.namespace)
    path = f"/api/v1/namespaces/{t.namespace}/secrets"
    changed: list[str] = []
    existing = api.get(f"{path}/{t.secret}")
    old = _from_secret(existing) if existing else None
    bundle = settle_bundle(old, names, t.renew_before)
    if existing is None:
        try:
            api.post(path, _secret(t.secret, t.namespace, bundle, None))
            changed.append(f"created Secret {t.namespace}/{t.secret}")
        except ApiError as e:
            if e.status != 409:
                raise
            raced = api.get(f"{path}/{t.secret}")  # another run created it first: use that one
            bundle = (_from_secret(raced) if raced else None) or bundle
    elif bundle is not old:
        rv = (existing.get("metadata") or {}).get("resourceVersion")
        api.put(f"{path}/{t.secret}", _secret(t.secret, t.namespace, bundle, rv))
        changed.append(f"renewed Secret {t.namespace}/{t.secret}")
    if patch_ca_bundle(api, t.webhook, bundle.ca_pem):
        changed.append(f"patched the caBundle of MutatingWebhookConfiguration {t.webhook}")
    return bundle, changed


def patch_ca_bundle(api: KubeApi, webhook: str, ca_pem: bytes) -> bool:
    """Set every webhook's ``clientConfig.caBundle`` to ``ca_pem``; False when all already had it."""
    path = f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{webhook}"
    cfg = api.get(path)
    if cfg is None:
        raise ApiError(404, f"MutatingWebhookConfiguration {webhook} not found (apply the manifests first)")
    want = base64.b64encode(ca_pem).decode()
    rv = (cfg.get("metadata") or {}).get("resourceVersion")
    ops: list[dict[str, Any]] = [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}] if rv else []
    for i, hook in enumerate(cfg.get("webhooks") or []):
        if (hook.get("clientConfig") or {}).get("caBundle") != want:
            ops.append({"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": want})
    if len(ops) == (1 if rv else 0):
        return False
    api.patch_json(path, ops)
    return True
