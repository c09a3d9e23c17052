"""What the sweep says about the Ray dashboard: its URL and how to get past its token dialog.

With token authentication on (the default for a local ``ray.init`` in this Ray), the dashboard
asks for a token before it shows anything. The sweep says where that token comes from; it never
prints or logs the token itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from rich.console import Console

log = logging.getLogger(__name__)

TOKEN_DOCS = "https://docs.ray.io/en/latest/ray-security/token-auth.html"


def token_auth_enabled() -> bool:
    """Whether this process's Ray uses token authentication (read from Ray, which also
    considers a token found on disk; ``RAY_AUTH_MODE`` alone where Ray cannot say)."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled  # no public API in Ray 2.60
    except ImportError:
        return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    return is_token_auth_enabled()


def token_source(env: Mapping[str, str]) -> str:
    """Where ``ray get-auth-token`` reads this process's token from (never the token itself)."""
    if env.get("RAY_AUTH_TOKEN"):
        return "from the RAY_AUTH_TOKEN environment variable of this shell"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return f"from {env['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH)"
    return "from ~/.ray/auth_token"


def auth_hint(address: str | None, enabled: bool, env: Mapping[str, str]) -> str:
    """One line on authenticating to the dashboard; ``address`` None: a Ray started by this sweep."""
    if not enabled:
        return "Dashboard authentication: off (no token needed)."
    if address is None:
        return ("Dashboard authentication: token. Paste the token that `ray get-auth-token` prints "
                f"(it reads it {token_source(env)}) into the dashboard's dialog. To run without it on a "
                "trusted machine, start the sweep with RAY_AUTH_MODE=disabled. See " + TOKEN_DOCS)
    return ("Dashboard authentication: token. The dashboard asks for the cluster's token, which comes from "
            "whoever started the cluster (on its head node, `ray get-auth-token` prints it). See " + TOKEN_DOCS)


def dashboard_url() -> str | None:
    """The connected Ray's dashboard URL (with its scheme), or None when Ray runs without one."""
    try:
        from ray._private.worker import get_dashboard_url  # ray.init's return value only has it once

        url = get_dashboard_url()
    except Exception as e:  # not connected, or a Ray without the helper: the sweep runs regardless
        log.debug("no dashboard URL: %s", e)
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def print_dashboard(console: Console, address: str | None, url: str | None = None) -> None:
    """Print the dashboard URL (``url``, else the connected Ray's) and how to authenticate to it;
    nothing when there is no dashboard."""
    if url and "://" not in url:
        url = f"http://{url}"
    url = url or dashboard_url()
    if url is None:
        return
    console.print(f"Ray dashboard: {url}")
    console.print(auth_hint(address, token_auth_enabled(), os.environ))
