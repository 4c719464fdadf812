"""Signed one-click unsubscribe links for digest emails.

A token is the user's id signed with the deployment's secret (itsdangerous, HMAC
SHA-1 over a salted key, URL-safe). It does not expire: a link in an old email must
still unsubscribe. Anyone holding the link can unsubscribe that user, which is exactly
what RFC 8058 one-click unsubscribe asks for; nobody can forge a link for another user
without the secret.
"""

from __future__ import annotations

from itsdangerous import BadData, URLSafeSerializer

# Separates these signatures from any other use of the same secret.
UNSUBSCRIBE_SALT = "herald.unsubscribe.v1"
# The path the ingest API serves unsubscribe requests on (GET shows, POST unsubscribes).
UNSUBSCRIBE_PATH = "/v1/unsubscribe/"


def _serializer(secret: str) -> URLSafeSerializer:
    if not secret:
        raise ValueError("an unsubscribe secret is required")
    return URLSafeSerializer(secret, salt=UNSUBSCRIBE_SALT)


def make_unsubscribe_token(user_id: int, secret: str) -> str:
    """A URL-safe token naming `user_id`, signed with `secret`.

    Parameters:
      user_id: the user the link unsubscribes.
      secret: the deployment's signing key (settings ``secret_key``).
    """
    token = _serializer(secret).dumps(int(user_id))
    return token if isinstance(token, str) else token.decode("ascii")


def read_unsubscribe_token(token: str, secret: str) -> int | None:
    """The user id in `token`, or ``None`` if it was tampered with or is malformed.

    Parameters:
      token: the last path segment of an unsubscribe link.
      secret: the key the token was signed with.
    """
    serializer = _serializer(secret)
    try:
        value = serializer.loads(token)
    except (BadData, UnicodeError, ValueError):
        return None
    # bool is an int subclass; a signed `true` is not a user id.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def unsubscribe_url(base_url: str, user_id: int, secret: str) -> str:
    """``{base_url}/v1/unsubscribe/{token}`` for `user_id`.

    Parameters:
      base_url: herald's public URL, e.g. ``https://herald.example.com`` (a trailing
        slash is ignored).
      user_id: the user the link unsubscribes.
      secret: the deployment's signing key.
    """
    return base_url.rstrip("/") + UNSUBSCRIBE_PATH + make_unsubscribe_token(user_id, secret)
