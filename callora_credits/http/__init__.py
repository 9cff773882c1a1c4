"""The HTTP layer: the blueprint, its views, request and response schemas,
the OpenAPI document, authentication and ``@charge_credits``.

It parses, authenticates, calls :mod:`callora_credits.core` and serializes;
HTTP statuses live here and nowhere below.
"""
