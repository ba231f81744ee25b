"""Collection settings for the toolshed tests."""

# Run in a subprocess with 8 forced CPU devices by test_sharding_devices.py; importing it here would fail.
collect_ignore = ["sharding_devices_script.py"]
