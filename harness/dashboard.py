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


def token_auth_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process's Ray uses token authentication.

    Ray has no public accessor for its mode; ``RAY_AUTH_MODE`` is where it keeps it: ``ray.init``
    sets ``RAY_AUTH_MODE=token`` in this process when it turns authentication on (by default for a
    Ray it starts, or when it finds a token on disk for a cluster it joins), and a user disables it
    by setting ``RAY_AUTH_MODE=disabled``. Read after ``ray.init``."""
    return (os.environ if env is None else env).get("RAY_AUTH_MODE", "").strip().lower() == "token"


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
    """The connected Ray's dashboard URL (with its scheme), or None when Ray runs without one.

    Through public API: ``ray.init`` on a connected process returns the running Ray's context
    (``ignore_reinit_error``), whose ``dashboard_url`` is the one the first ``ray.init`` returned;
    ``RAY_OVERRIDE_DASHBOARD_URL`` wins, as in Ray itself."""
    url = os.environ.get("RAY_OVERRIDE_DASHBOARD_URL")
    if not url:
        try:
            import ray

            if not ray.is_initialized():
                return None
            url = ray.init(ignore_reinit_error=True).dashboard_url
        except Exception as e:  # a client connection, say: the sweep runs regardless
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
