"""The hub's MQTT side: its own client (``client``), the supervised bus on it (``bus``),
what every bus offers the hub (``busapi``), and the typed bus edge (``inbox``)."""
