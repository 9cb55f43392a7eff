"""Provider credentials: what Tollgate sends upstream on a caller's behalf.

* ``secrets``   secret sources: an environment variable, or a file re-read when it changes
* ``vault``     provider keys by provider, used in turn, injected per attempt
* ``azure_ad``  Azure AD (Entra ID) client-credentials tokens for Azure OpenAI
* ``settings``  the ``azure_ad:`` block of a provider

Caller authentication (``extproc.auth``) does not depend on this package.
"""
