"""Host-trainer adapters, one module per host; installed as `lpl_plugin.patches`."""
