#!/usr/bin/env bash
# Developer helper: regenerate a migration by autogenerate against an empty SQLite file
# migrated to the previous head. Usage: gateway/migrations/regen.sh REV_ID "message"
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -f /tmp/fgw-autogen.db
.venv/bin/python - "$1" "$2" <<'PY'
import sys
from alembic import command
from gateway.db.migrate import alembic_config
cfg = alembic_config("sqlite+aiosqlite:////tmp/fgw-autogen.db")
command.upgrade(cfg, "head")
command.revision(cfg, message=sys.argv[2], autogenerate=True, rev_id=sys.argv[1])
PY
