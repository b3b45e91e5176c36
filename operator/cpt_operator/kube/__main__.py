"""`python -m cpt_operator.kube`: run the operator (settings from the environment, see
`settings.Settings.from_env`)."""
from __future__ import annotations

import logging
import sys

import kopf

from . import handlers


def main() -> int:
    settings = handlers.SETTINGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every successful timer run at INFO: one line per run every few seconds
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf_settings = kopf.OperatorSettings()
    kopf_settings.peering.lifetime = settings.peering_lifetime_s
    kopf.run(
        settings=kopf_settings,
        standalone=not settings.peering,
        peering_name=settings.peering or None,
        priority=settings.peering_priority,
        namespaces=list(settings.namespaces),
        clusterwide=not settings.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
