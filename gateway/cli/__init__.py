"""``fhir-gateway`` command line (typer): one module per command group.

* :mod:`~gateway.cli.server`: ``serve``, ``worker``, ``db upgrade``;
* :mod:`~gateway.cli.mllp`: ``mllp`` (the HL7 v2 listener);
* :mod:`~gateway.cli.clients`: ``clients create|list|revoke|scopes``;
* :mod:`~gateway.cli.profiles`: ``profiles check|preview|schema|remap``;
* :mod:`~gateway.cli.deliveries`: ``deliveries list|show|replay``;
* :mod:`~gateway.cli.keys`: ``keys rotate|list|jwks|prune|encryption-key|rotate-kek``;
* :mod:`~gateway.cli.audit`: ``audit verify|export|purge|seal``;
* :mod:`~gateway.cli.staff`: ``staff create|list|disable|enable|password|role``;
* :mod:`~gateway.cli.demo`: ``demo``;
* :mod:`~gateway.cli.imports`: ``import`` (bulk backfill, issue 16);
* :mod:`~gateway.cli.reconcile`: ``reconcile`` (gateway against an EHR target).

Every command loads its settings and profiles with :mod:`gateway.cli.common`.
"""

from __future__ import annotations

import typer

from gateway.cli import (
    audit,
    clients,
    deliveries,
    demo,
    imports,
    keys,
    mllp,
    profiles,
    reconcile,
    server,
    staff,
)
from gateway.cli.common import plain_help_everywhere
from gateway.cli.demo import stripe_signature_header

__all__ = ["app", "main", "stripe_signature_header"]

app = typer.Typer(
    help="fhir-gateway: FHIR R4 interoperability gateway for telehealth.", no_args_is_help=True
)
app.command("serve")(server.serve)
app.command("worker")(server.worker)
app.command("mllp")(mllp.mllp)
app.command("demo")(demo.demo)
app.command("import")(imports.import_cmd)
app.command("reconcile")(reconcile.reconcile_cmd)
app.add_typer(server.db_app, name="db")
app.add_typer(clients.app, name="clients")
app.add_typer(profiles.app, name="profiles")
app.add_typer(deliveries.app, name="deliveries")
app.add_typer(keys.app, name="keys")
app.add_typer(audit.app, name="audit")
app.add_typer(staff.app, name="staff")
plain_help_everywhere(app)


def main() -> None:
    """Entry point for ``python -m gateway.cli``."""
    app()
