"""Identity and access: OIDC/JWT bearer tokens in, an ``Identity`` out, team policy, deny list.

Modules, each one concern:

* ``jwks``          signing keys from a JWKS URL (cached, throttled refresh) or file
* ``verifier``      a bearer JWT → verified claims (issuer, alg allow-list, kid, exp/nbf/iat/aud)
* ``identity``      claims → principal, team, tier (configurable claim paths)
* ``policy``        which aliases a team may call
* ``token_cache``   verified tokens by hash, until their exp
* ``deny_store``    the deny list in Redis or a local file; ``denylist`` keeps a local copy in step
* ``authenticator`` the above in the order a request meets them, plus the audit line (``audit``)
* ``devtoken``      a local dev key and ``tollgate dev-token``
* ``settings``      the ``auth:`` and ``teams:`` config sections
* ``build``         config → these objects

Provider credentials (keys, Azure AD tokens, secret files) are ``extproc.credentials``; nothing
here imports it.
"""
