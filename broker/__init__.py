"""The embedded MQTT broker (amqtt): listeners, authentication and topic ACLs."""
