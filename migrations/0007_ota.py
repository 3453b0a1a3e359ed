from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.fields.base import OnDelete
from uuid import uuid4
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('models', '0006_device_config')]

    initial = False

    operations = [
        ops.CreateModel(
            name='OtaKey',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ('status', fields.CharField(db_index=True, description='active, next or retired', max_length=16)),
                ('public_key_pem', fields.TextField(unique=False)),
                ('private_key_sealed', fields.TextField(unique=False)),
                ('activated_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('retired_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'ota_keys', 'app': 'models', 'pk_attr': 'id', 'table_description': 'An ECDSA P-256 signing key. The private key is stored sealed (AES-256-GCM under the'},
            bases=['TimestampedModel'],
        ),
        ops.CreateModel(
            name='OtaRelease',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ('model', fields.CharField(max_length=64)),
                ('version', fields.CharField(max_length=64)),
                ('channel', fields.CharField(description='dev, beta or stable', max_length=16)),
                ('security_version', fields.IntField(default=0, db_default=0)),
                ('notes', fields.TextField(null=True, unique=False)),
                ('sha256', fields.CharField(max_length=64)),
                ('size', fields.BigIntField()),
                ('status', fields.CharField(default='draft', db_index=True, description='draft, published, halted or withdrawn', db_default='draft', max_length=16)),
                ('rollout_percent', fields.IntField(default=0, db_default=0)),
                ('halt_failure_percent', fields.IntField(default=20, db_default=20)),
                ('expires_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('key_id', fields.CharField(description='the key that signed the manifest', max_length=64)),
                ('next_key_id', fields.CharField(null=True, max_length=64)),
                ('manifest', fields.TextField(description='the manifest as signed, in canonical JSON, with its algorithm and signature', unique=False)),
                ('alg', fields.CharField(max_length=32)),
                ('signature', fields.TextField(unique=False)),
                ('created_by', fields.UUIDField(null=True)),
                ('published_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('halted_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('resumed_at', fields.DatetimeField(null=True, description='reports before this time do not count towards halting (set when republished)', auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'ota_releases', 'app': 'models', 'unique_together': (('model', 'version'),), 'pk_attr': 'id', 'table_description': 'A firmware image, the fields of its signed manifest, and where it is in its life.'},
            bases=['TimestampedModel'],
        ),
        ops.CreateModel(
            name='OtaReport',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('device', fields.ForeignKeyField('models.Device', source_field='device_id', db_constraint=True, to_field='id', related_name='ota_reports', on_delete=OnDelete.CASCADE)),
                ('release', fields.ForeignKeyField('models.OtaRelease', source_field='release_id', db_constraint=True, to_field='id', related_name='reports', on_delete=OnDelete.CASCADE)),
                ('status', fields.CharField(max_length=16)),
                ('error', fields.CharField(null=True, max_length=500)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ('updated_at', fields.DatetimeField(auto_now=True, auto_now_add=False)),
            ],
            options={'table': 'ota_reports', 'app': 'models', 'unique_together': (('device', 'release'),), 'pk_attr': 'id', 'table_description': 'The last report one device made about one release.'},
            bases=['Model'],
        ),
        ops.AddField(
            model_name='Device',
            name='ota_channel',
            field=fields.CharField(default='stable', description='dev, beta or stable', db_default='stable', max_length=16),
        ),
        ops.AddField(
            model_name='Device',
            name='ota_error',
            field=fields.CharField(null=True, max_length=500),
        ),
        ops.AddField(
            model_name='Device',
            name='ota_release_id',
            field=fields.UUIDField(null=True, description='the release of the last OTA report'),
        ),
        ops.AddField(
            model_name='Device',
            name='ota_security_version',
            field=fields.IntField(default=0, description='the highest security version applied (anti-rollback)', db_default=0),
        ),
        ops.AddField(
            model_name='Device',
            name='ota_status',
            field=fields.CharField(null=True, max_length=16),
        ),
        ops.AddField(
            model_name='Device',
            name='ota_updated_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
    ]
