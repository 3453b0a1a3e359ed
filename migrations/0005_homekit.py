from tortoise import migrations
from tortoise.migrations import operations as ops
from orjson import loads
from tortoise.fields.base import OnDelete
from tortoise.fields.data import JSON_DUMPS
from uuid import uuid4
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('models', '0004_integration_kind')]

    initial = False

    operations = [
        ops.CreateModel(
            name='HomeKitBridge',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ('org', fields.OneToOneField('models.Organization', source_field='org_id', db_constraint=True, to_field='id', related_name='homekit_bridge', on_delete=OnDelete.CASCADE)),
                ('enabled', fields.BooleanField(default=False, db_default=False)),
                ('port', fields.IntField(null=True, description='the TCP port the bridge listens on, chosen once when any free one (0) was asked for')),
                ('requested_port', fields.IntField(default=0, description='the port asked for (0: any free one), kept so a restart knows whether it may move', db_default=0)),
                ('hap_id', fields.CharField(max_length=17)),
                ('setup_code', fields.CharField(max_length=10)),
                ('setup_id', fields.CharField(description='four characters of the X-HM setup URI that tell this bridge from others', max_length=4)),
                ('next_aid', fields.IntField(default=2, description='the next accessory id (AID) to hand out (AIDs are never reused within a bridge)', db_default=2)),
                ('hap_state', fields.JSONField(null=True, description='the persisted state of HAP-python (keys, pairings, configuration number), or None', encoder=JSON_DUMPS, decoder=loads)),
            ],
            options={'table': 'homekit_bridges', 'app': 'models', 'pk_attr': 'id', 'table_description': 'The HomeKit bridge of an organization: its settings and its HAP identity.'},
            bases=['TimestampedModel'],
        ),
        ops.CreateModel(
            name='HomeKitAccessory',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('bridge', fields.ForeignKeyField('models.HomeKitBridge', source_field='bridge_id', db_constraint=True, to_field='id', related_name='accessories', on_delete=OnDelete.CASCADE)),
                ('device', fields.ForeignKeyField('models.Device', source_field='device_id', db_constraint=True, to_field='id', related_name='homekit_accessories', on_delete=OnDelete.CASCADE)),
                ('aid', fields.IntField()),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={'table': 'homekit_accessories', 'app': 'models', 'unique_together': (('bridge', 'aid'), ('bridge', 'device')), 'pk_attr': 'id', 'table_description': 'A device bridged into the HomeKit bridge of its organization, with its accessory id.'},
            bases=['Model'],
        ),
    ]
