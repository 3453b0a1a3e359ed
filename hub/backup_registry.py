"""What a backup holds, declared once.

- Every table the ORM knows: the models registered under ``hexa.models``, discovered at run
  time and ordered so that a table comes after the tables its foreign keys point to. A model
  added later (OTA releases, anything) is in the next backup without a change here.
- The data directory's secrets (``secrets.json``: the JWT secret, which also keys the sealed
  HomeKit pairings stored in ``homekit_bridges``, and the device provision key).
- The data directory's file trees in :data:`TREES` (OTA artifacts and their key file), when
  present.

Never in a backup: the backup key itself, the backups directory, the SQLite file (its
content is in the tables).
"""

from __future__ import annotations

from dataclasses import dataclass

from tortoise import Tortoise, fields
from tortoise.fields.relational import ForeignKeyFieldInstance, OneToOneFieldInstance
from tortoise.models import Model

#: data-directory files put back by a restore (relative to the data directory)
FILES: tuple[str, ...] = ("secrets.json",)
#: data-directory trees put back by a restore, every file under them, when they exist
TREES: tuple[str, ...] = ("ota",)

APP = "models"


@dataclass(frozen=True)
class Column:
    name: str
    #: how the value is written in a backup: uuid, datetime, date, bool, json, int, float,
    #: decimal, bytes or text
    kind: str


@dataclass(frozen=True)
class Table:
    name: str
    model: str
    columns: tuple[Column, ...]


def _kind(field: fields.Field[object]) -> str:
    if isinstance(field, fields.UUIDField):
        return "uuid"
    if isinstance(field, fields.DatetimeField):
        return "datetime"
    if isinstance(field, fields.DateField):
        return "date"
    if isinstance(field, fields.BooleanField):
        return "bool"
    if isinstance(field, fields.JSONField):
        return "json"
    if isinstance(field, fields.FloatField):
        return "float"
    if isinstance(field, fields.DecimalField):
        return "decimal"
    if isinstance(field, fields.BinaryField):
        return "bytes"
    if isinstance(field, fields.IntField | fields.BigIntField | fields.SmallIntField):
        return "int"
    return "text"


def models() -> dict[str, type[Model]]:
    """The ORM's models by name, registering them when the ORM is not initialised."""
    if not Tortoise.apps or APP not in Tortoise.apps:
        Tortoise.init_models(["hexa.models"], APP)
    assert Tortoise.apps is not None
    return dict(Tortoise.apps[APP])


def _table(model: type[Model]) -> Table:
    meta = model._meta
    columns = tuple(
        Column(column, _kind(meta.fields_map[name]))
        for name, column in sorted(meta.fields_db_projection.items(), key=lambda kv: kv[1])
    )
    return Table(meta.db_table, model.__name__, columns)


def tables() -> list[Table]:
    """Every model's table, each after the tables its foreign keys reference."""
    found = models()
    by_name = {model._meta.db_table: model for model in found.values()}
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order or name in visiting:
            return
        visiting.add(name)
        for field in by_name[name]._meta.fields_map.values():
            if isinstance(field, ForeignKeyFieldInstance | OneToOneFieldInstance):
                target = field.related_model._meta.db_table
                if target != name and target in by_name:
                    visit(target)
        visiting.discard(name)
        order.append(name)

    for name in sorted(by_name):
        visit(name)
    return [_table(by_name[name]) for name in order]
