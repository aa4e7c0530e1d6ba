"""Connectors: one contract (``Connector``) for every kind of source."""

from __future__ import annotations

from typing import TYPE_CHECKING

from integration.connectors.base import META_COLUMNS, Connector, ReadRequest
from integration.connectors.csv import CsvConnector
from integration.connectors.excel import ExcelConnector
from integration.connectors.odbc import OdbcConnector
from integration.connectors.rest import RestConnector, RestSettings
from integration.connectors.sql import SqlConnector

if TYPE_CHECKING:
    from integration.project import Project


def connector_for(project: Project, source: str) -> Connector:
    """Build the connector for a source declared in the project."""
    # Imported here: integration.project imports the mapping engine, which imports this package (a module
    # importing integration.project first, as `crmi dedup decide` does, would meet a half-built module).
    from integration.project import CsvSource, ExcelSource, K3CloudSource, OdbcSource, RestSource, SqlSource

    config = project.spec.sources[source]
    if isinstance(config, ExcelSource):
        return ExcelConnector(source, project.source_paths(source), config.path)
    if isinstance(config, SqlSource):
        return SqlConnector(
            source, project.source_url(source), config.db_schema, arrow=config.reader == "auto"
        )
    if isinstance(config, OdbcSource):
        return OdbcConnector(
            source,
            project.source_connection_string(source),
            encoding=config.encoding,
            schema=config.db_schema,
        )
    if isinstance(config, CsvSource):
        return CsvConnector(
            source,
            project.source_paths(source),
            config.path,
            encoding=config.encoding,
            delimiter=config.delimiter,
        )
    if isinstance(config, RestSource):
        return RestConnector(source, RestSettings(**project.rest_settings(source)))  # type: ignore[arg-type]
    if isinstance(config, K3CloudSource):
        from integration.connectors.k3cloud import K3CloudConnector

        return K3CloudConnector(source, project.k3cloud_settings(source))
    raise TypeError(f"no connector for {type(config).__name__}")


__all__ = [
    "META_COLUMNS",
    "Connector",
    "CsvConnector",
    "ExcelConnector",
    "OdbcConnector",
    "ReadRequest",
    "SqlConnector",
    "connector_for",
]
