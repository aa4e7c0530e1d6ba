#!/bin/sh
# Compose only: the postgres image runs this once, on an empty data volume. It creates the core database
# beside Dagster's (POSTGRES_DB); both belong to POSTGRES_USER.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c "CREATE DATABASE \"${CRM_CORE_DB:-crm_core}\" OWNER \"$POSTGRES_USER\""
