"""A minimal worker: the few lines a service needs, plus a loop that shows the sharing.

Configuration comes from the environment (see ``SharedTokenProvider.from_env``). Run several
copies against one Redis and watch them report the same token fingerprint while only one of
them exchanges (``docker compose up --scale worker=3``).
"""

from __future__ import annotations

import logging
import os
import time

from k2_shared_token import K2TokenError, SharedTokenProvider
from k2_shared_token._core.tokens import fingerprint_of

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
log = logging.getLogger("example.worker")


def main() -> None:
    provider = SharedTokenProvider.from_env()
    interval = float(os.environ.get("WORKER_INTERVAL", "5"))
    rounds = int(os.environ.get("WORKER_ROUNDS", "0"))  # 0: run until stopped
    done = 0
    while rounds == 0 or done < rounds:
        try:
            token = provider.get()
            log.info("token %s, %.0f s left", fingerprint_of(token.value), token.seconds_left())
        except K2TokenError as exc:
            log.warning("no token: %s", exc)
        done += 1
        time.sleep(interval)


if __name__ == "__main__":
    main()
