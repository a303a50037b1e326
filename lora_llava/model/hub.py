"""Hub ids without the hub's retries: a machine without network learns it in seconds, with what to do instead.

Left alone, huggingface_hub retries an unreachable endpoint with back-off for
minutes per file. Before the first download of a run, `require_hub` opens
one TCP connection to the endpoint (or the proxy) with a short timeout. When
it fails, a model already in the local cache is read from there (offline
mode for the rest of the process); one that is not is an error naming the id
and the local-folder alternative.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from urllib.parse import urlparse

from ..errors import ModelError

PROBE_TIMEOUT = 3.0  # seconds: a reachable endpoint answers a TCP connect well within this
_reachable: dict[str, str | None] = {}  # endpoint -> None when reachable, else why not


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return isinstance(found, str)


def _probe(endpoint: str) -> str | None:
    """None when a TCP connection to the endpoint (or the HTTPS proxy) opens; else the reason."""
    if endpoint not in _reachable:
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
        if proxy and urllib.request.proxy_bypass(urlparse(endpoint).hostname or ""):
            proxy = None  # NO_PROXY names the endpoint
        if proxy and "://" not in proxy:
            proxy = "http://" + proxy  # `proxy.corp:3128`, as requests accepts it
        url = urlparse(proxy or endpoint)
        try:
            host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
            _reachable[endpoint] = None
        except ValueError:  # a malformed port: the probe cannot tell, so the hub client decides
            _reachable[endpoint] = None
        except OSError as e:
            _reachable[endpoint] = f"{url.hostname}:{url.port or ''}: {e.strerror or type(e).__name__}"
    return _reachable[endpoint]


def _go_offline() -> None:
    """Read the cache only from now on (huggingface_hub reads its offline flag once, at import)."""
    import huggingface_hub.constants as constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def require_hub(repo_id: str, key: str, revision: str | None = None) -> None:
    """Return when `repo_id` can be read (hub reachable, or cached); else a `ModelError` in one line."""
    import huggingface_hub.constants as constants

    download = f"download it where there is network (`huggingface-cli download {repo_id} --local-dir DIR`) and set {key}: DIR"
    if _offline_env() or constants.HF_HUB_OFFLINE:
        if _cached(repo_id, revision):
            return
        raise ModelError(f"{key}: {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {download}")
    why = _probe(constants.ENDPOINT)
    if why is None:
        return
    if _cached(repo_id, revision):
        print(f"the Hugging Face Hub cannot be reached ({why}); reading {repo_id} from the local cache", file=sys.stderr)
        _go_offline()
        return
    raise ModelError(f"{key}: {repo_id} is a hub id, but the Hugging Face Hub cannot be reached ({why}); {download}")
