"""Keep credentials out of params, logs, errors and releases.

Credentials reach the pipeline from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``) or a named profile (``AWS_PROFILE`` / ``storage_options: {profile: NAME}``),
never from ``params.yaml``: anything in params is printed by ``longlive config``, recorded in
``dvc.lock`` and published in every release. So a key that looks like a secret in a
``storage_options`` mapping is refused with the fix named, and any URL that goes into a message has
its ``user:password@`` part replaced.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

REDACTED = "***"

# Option names (any nesting level, case-insensitive) that carry a credential in fsspec / s3fs / botocore.
_SECRET_KEY = re.compile(
    r"(^|_)(key|secret|password|passwd|token|credentials?)$|^(aws_)?(access_key_id|secret_access_key|session_token)$",
    re.IGNORECASE,
)
# Options whose names end like a secret's but are not one.
_NOT_SECRET = {"sse_kms_key_id", "kms_key_id", "default_fill_cache", "requester_pays", "use_listings_cache"}

# scheme://user[:password]@host -> scheme://***@host. The password may hold a raw '/' (AWS secret keys do,
# and people paste them unquoted), where urlsplit would end the host and leave the rest in the path.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+(?::[^@\s'\"]*)?)@")
# key=value / key: value pairs inside free text whose key looks like a credential.
_TEXT_PAIR = re.compile(
    r"(?P<key>\b(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret|password|token)\b['\"]?\s*[:=]\s*['\"]?)"
    r"(?P<value>[^\s'\",}]+)",
    re.IGNORECASE,
)


SECRET_FIX = (
    "credentials must not be in params (they would be printed, recorded in dvc.lock and published in releases); "
    "remove them and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment, or name a profile "
    "(AWS_PROFILE, or storage_options: {profile: NAME})"
)


class SecretInParamsError(ValueError):
    """A credential was given where it would be recorded (params, CLI options saved in a release).

    ``keys``: the dotted paths of the offending keys (never their values), so a caller that knows where
    the options sit (``presets.tiny.publish``) can name the full key."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = list(keys)
        super().__init__(f"{', '.join(k or '<value>' for k in self.keys)}: {SECRET_FIX}")


def is_secret_key(name: str) -> bool:
    return name.lower() not in _NOT_SECRET and bool(_SECRET_KEY.search(name))


def find_secret_keys(options: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key in a (nested) mapping whose name looks like a credential."""
    found: list[str] = []
    if isinstance(options, Mapping):
        for key, value in options.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if is_secret_key(str(key)) and value not in (None, "", False):
                found.append(path)
            else:
                found += find_secret_keys(value, path)
    elif isinstance(options, (list, tuple)):
        for i, value in enumerate(options):
            found += find_secret_keys(value, f"{prefix}[{i}]")
    elif isinstance(options, str) and _URL_USERINFO.search(options):
        found.append(prefix)  # "" when the value itself is the URL
    return found


def check_no_secrets(options: Any, where: str) -> None:
    """Refuse credentials in ``options`` (``where`` names the params key), naming the fix."""
    keys = find_secret_keys(options, where)
    if keys:
        raise SecretInParamsError(keys)


def redact_url(url: str) -> str:
    """``scheme://user:pass@host/path`` -> ``scheme://***@host/path`` (and ``?token=...`` values); others unchanged."""
    return redact(url)


def redact(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """Remove credentials from free text: URL user-info, ``secret=...`` pairs and any literal ``secrets``."""
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    text = _TEXT_PAIR.sub(lambda m: f"{m['key']}{REDACTED}", text)
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
    return text


def redact_options(options: Any) -> Any:
    """A copy of a (nested) options mapping with every credential value replaced and URLs redacted."""
    if isinstance(options, Mapping):
        return {k: (REDACTED if is_secret_key(str(k)) and v not in (None, "") else redact_options(v))
                for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    if isinstance(options, str):
        return redact(options)
    return options
