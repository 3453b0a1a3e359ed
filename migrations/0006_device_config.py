from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('models', '0005_homekit')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Device',
            name='config_applied_version',
            field=fields.IntField(default=0, description='the last config_version the device acknowledged', db_default=0),
        ),
        ops.AddField(
            model_name='Device',
            name='config_version',
            field=fields.IntField(default=0, description='bumped by every IO or power-restore change (0 = the factory defaults)', db_default=0),
        ),
        ops.AddField(
            model_name='Device',
            name='power_restore_mode',
            field=fields.CharField(default='off', description='what the relays do when power returns (off, on or restore)', db_default='off', max_length=16),
        ),
        ops.AddField(
            model_name='DeviceInput',
            name='link',
            field=fields.CharField(default='linked', description='linked (drives its relay on the device) or detached (reports events only)', db_default='linked', max_length=16),
        ),
        ops.AddField(
            model_name='DeviceInput',
            name='rocker_mode',
            field=fields.CharField(null=True, description='follow or flip for a rocker, None for a push button', max_length=16),
        ),
        ops.AddField(
            model_name='DeviceInput',
            name='type',
            field=fields.CharField(default='push', description='push or rocker', db_default='push', max_length=16),
        ),
    ]
