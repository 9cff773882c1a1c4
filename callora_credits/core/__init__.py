"""The domain core: operations that validate themselves, how they are posted
inside one transaction, the records they return, idempotency and the
:class:`~callora_credits.core.ledger.Ledger` facade.

Nothing here imports Flask's ``request`` or knows an HTTP status.
"""
