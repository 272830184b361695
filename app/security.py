"""API keys: high-entropy random strings, stored only as a SHA-256 hash.

A slow hash (argon2) buys nothing for 256-bit random keys and would cost every request; the
`tqk_` prefix lets secret scanners recognise leaked keys.
"""

import hashlib
import secrets

KEY_PREFIX = "tqk_"


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
