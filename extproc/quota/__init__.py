"""Token and money governance: count, price, limit, meter and record.

The request path uses these building blocks (see ``governor.py`` for the one
object it talks to):

- ``tokenizer.Tokenizer`` counts a chat request's prompt tokens locally, as
  the provider will bill them, and counts streamed output text.
- ``prices.PriceTable`` turns token usage into exact integer micro-dollars.
- ``limits`` holds the value types: the limits of one scope (token bucket,
  daily/monthly budgets), a ``Reservation``, a ``Rejection``.
- ``store.QuotaStore`` checks and deducts every scope of a request in one
  atomic step (``memory_store`` for one sidecar, ``redis_store`` shared).
- ``ledger`` appends one usage record per request and sums them for
  ``tollgate spend``.
- ``settings`` parses the ``quota:`` section of the config; ``policy`` maps
  a caller (principal, team, alias) to the scopes that apply.
"""
