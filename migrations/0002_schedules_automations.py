from tortoise import migrations
from tortoise.migrations import operations as ops
from orjson import loads
from tortoise.fields.base import OnDelete
from tortoise.fields.data import JSON_DUMPS
from uuid import uuid4
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('models', '0001_initial')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Automation',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ('org', fields.ForeignKeyField('models.Organization', source_field='org_id', db_constraint=True, to_field='id', related_name='automations', on_delete=OnDelete.CASCADE)),
                ('device', fields.ForeignKeyField('models.Device', source_field='device_id', null=True, db_constraint=True, to_field='id', related_name='automations', on_delete=OnDelete.SET_NULL)),
                ('name', fields.CharField(max_length=200)),
                ('enabled', fields.BooleanField(default=True, db_default=True)),
                ('trigger', fields.JSONField(encoder=JSON_DUMPS, decoder=loads)),
                ('conditions', fields.JSONField(default=list, encoder=JSON_DUMPS, decoder=loads)),
                ('actions', fields.JSONField(encoder=JSON_DUMPS, decoder=loads)),
                ('cooldown_s', fields.IntField(default=0, db_default=0)),
                ('dedupe_window_ms', fields.IntField(default=0, db_default=0)),
                ('is_default', fields.BooleanField(default=False, db_default=False)),
                ('last_fired_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('fire_count', fields.IntField(default=0, db_default=0)),
            ],
            options={'table': 'automations', 'app': 'models', 'pk_attr': 'id', 'table_description': 'A trigger, optional conditions and actions, with cooldown and de-duplication.'},
            bases=['TimestampedModel'],
        ),
        ops.CreateModel(
            name='AutomationRun',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('automation', fields.ForeignKeyField('models.Automation', source_field='automation_id', db_constraint=True, to_field='id', related_name='runs', on_delete=OnDelete.CASCADE)),
                ('at', fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=True)),
                ('outcome', fields.CharField(max_length=32)),
                ('event', fields.JSONField(default=dict, encoder=JSON_DUMPS, decoder=loads)),
                ('results', fields.JSONField(default=list, encoder=JSON_DUMPS, decoder=loads)),
            ],
            options={'table': 'automation_runs', 'app': 'models', 'pk_attr': 'id', 'table_description': 'One evaluation of an automation that a trigger matched.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Schedule',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ('org', fields.ForeignKeyField('models.Organization', source_field='org_id', db_constraint=True, to_field='id', related_name='schedules', on_delete=OnDelete.CASCADE)),
                ('device', fields.ForeignKeyField('models.Device', source_field='device_id', db_constraint=True, to_field='id', related_name='schedules', on_delete=OnDelete.CASCADE)),
                ('name', fields.CharField(max_length=200)),
                ('cron', fields.CharField(max_length=120)),
                ('timezone', fields.CharField(default='UTC', db_default='UTC', max_length=64)),
                ('enabled', fields.BooleanField(default=True, db_default=True)),
                ('action', fields.JSONField(encoder=JSON_DUMPS, decoder=loads)),
                ('next_execution', fields.DatetimeField(null=True, db_index=True, auto_now=False, auto_now_add=False)),
                ('last_execution', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('last_fired_local', fields.CharField(null=True, max_length=32)),
                ('execution_count', fields.IntField(default=0, db_default=0)),
                ('failure_count', fields.IntField(default=0, db_default=0)),
                ('last_result', fields.CharField(null=True, max_length=32)),
            ],
            options={'table': 'schedules', 'app': 'models', 'pk_attr': 'id', 'table_description': "A cron expression in a timezone that switches a device's relays."},
            bases=['TimestampedModel'],
        ),
    ]
