"""Provider credentials: the vault that injects keys, Azure AD client credentials, secret sources.

Caller authentication (``extproc.auth``) does not depend on this package."""
