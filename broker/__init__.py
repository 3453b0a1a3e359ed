"""The embedded MQTT broker: amqtt's ``Broker`` subclassed, its connection handling,
routing and delivery overridden with our own code; listeners, authentication, topic ACLs."""
