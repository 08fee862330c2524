"""PLC and plant outputs of the bridge: one result model fanned out to OPC UA, Modbus/TCP and MQTT."""
